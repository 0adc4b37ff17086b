"""The init as PID 1 of a real microVM: the tailored kernel, a root from our writers, QEMU.

Until the image builder exists, the test makes the closure by hand: it runs
the same scenario as a plain process, records every module file it loaded,
and packs those (with unchecked-hash pycs, as the builder should), the
interpreter and the ELF libraries ``ldd`` names, at their host paths. Each
compression method is booted, since only the kernel can say whether it
accepts our gzip, legacy lz4 and zstd, and so is the same closure as a
read-only squashfs root disk.
"""

from __future__ import annotations

import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest_support import APPS, SRC
from test_guest_init import marker, start_process

from uniframe.build.initramfs import Device, Directory, Entry, File, write_initramfs
from uniframe.build.rootfs import write_squashfs
from uniframe.build.unikernel import DISK_ROOT_ARGS
from uniframe.guest.cmdline import KERNEL_ARGS, encode_cmdline
from uniframe.guest.initscript import DEVICE_NODES, INIT_PATH, MOUNT_POINTS, render_init_script
from uniframe.guest.net import HOSTS_PATH, hosts_text

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SCENARIO = ["exit3", "1.0", "machine"]


@pytest.fixture(scope="module")
def kernel() -> Path:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from uniframe.build.kernel import ensure_kernel, user_kernel

    if override := os.environ.get("UNIFRAME_TEST_KERNEL"):
        return user_kernel(Path(override)).path
    return ensure_kernel().path


def elf_deps(path: Path) -> dict[str, Path]:
    """Archive path -> host file for what the dynamic loader will open (per ldd)."""
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    deps = {}
    for line in out.splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        if m := re.match(r"\s*(?:\S+ => )?(/\S+) \(", line):
            deps[m[1]] = Path(m[1]).resolve()
    return deps


def traced_files(tmp_path: Path) -> list[str]:
    """Run the scenario as a plain process and list the module files it loaded."""
    trace = tmp_path / "modules.json"
    os.environ["GUESTAPP_TRACE"] = str(trace)
    try:
        proc = start_process(tmp_path, encode_cmdline("guestapp", SCENARIO, console="none"))
        out, _ = proc.communicate(timeout=60)
    finally:
        del os.environ["GUESTAPP_TRACE"]
    assert marker(out) == (3, "exited"), out
    # Frozen modules report a __file__ of "frozen" (they live in the interpreter).
    files = [f for f in json.loads(trace.read_text()) if os.path.isabs(f)]
    # Child interpreters the app starts without -S import site as well, and
    # the interpreter finds its prefix by the landmark os.py.
    # (All three are frozen into the interpreter, so their spec names no file.)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return files + [str(stdlib / f"{name}.py") for name in ("site", "_sitebuiltins", "os")]


def closure(tmp_path: Path) -> list[Entry]:
    python = Path(sys.executable).resolve()
    sys_path = [p for p in sys.path if p.startswith(sys.base_prefix) and "site-packages" not in p]
    sys_path += [str(SRC), str(APPS)]
    entries: list[Entry] = [
        File(INIT_PATH, render_init_script(str(python), sys_path).encode(), mode=0o755),
        File(str(python), python),
        *(Device(path, kind, major, minor, mode)  # type: ignore[arg-type]
          for path, kind, major, minor, mode in DEVICE_NODES),
        *(Directory(d) for d in MOUNT_POINTS),
    ]
    elves = [python]
    pycs = tmp_path / "pycs"
    for name in sorted(set(traced_files(tmp_path))):
        path = Path(name)
        entries.append(File(name, path))
        if name.endswith(".so"):
            elves.append(path)
        elif name.endswith(".py"):
            tag = sys.implementation.cache_tag
            pyc = pycs / f"{len(entries)}.pyc"
            py_compile.compile(name, cfile=str(pyc), doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            entries.append(File(str(path.parent / "__pycache__" / f"{path.stem}.{tag}.pyc"), pyc))
    libs: dict[str, Path] = {}
    for elf in elves:
        libs.update(elf_deps(elf))
    entries += [File(dest, src) for dest, src in sorted(libs.items())]
    return entries


@pytest.fixture(scope="module")
def entries(tmp_path_factory: pytest.TempPathFactory) -> list[Entry]:
    return closure(tmp_path_factory.mktemp("closure"))


class Guest:
    """QEMU with the root as an initramfs, or as a read-only squashfs ``disk``."""

    def __init__(self, kernel: Path, initrd: Path | None, cmdline: str, disk: Path | None = None) -> None:
        argv = ["qemu-system-x86_64", "-M", "microvm,acpi=off,x-option-roms=off",
                "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "256M",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(kernel), "-append", " ".join([*KERNEL_ARGS, cmdline]),
                "-serial", "stdio"]
        if initrd is not None:
            argv += ["-initrd", str(initrd)]
        if disk is not None:
            argv += ["-drive", f"if=none,id=root,file={disk},format=raw,readonly=on",
                     "-device", "virtio-blk-device,drive=root"]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.output = b""

    def read_until(self, text: bytes, timeout: float) -> float:
        """Seconds since QEMU started when ``text`` appeared on the console."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stdout.fileno(), False)
        while text not in self.output:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.text}")
            chunk = self.proc.stdout.read(65536)
            if chunk:
                self.output += chunk
            elif self.proc.poll() is not None:
                self.output += self.proc.stdout.read() or b""
                if text not in self.output:
                    raise AssertionError(f"QEMU exited before {text!r}:\n{self.text}")
            else:
                time.sleep(0.05)
        return time.monotonic() - self.started

    def type(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), True)
        self.output += self.proc.stdout.read()
        return code

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace").replace("\r\n", "\n")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for guest in started:
        guest.kill()


@pytest.mark.parametrize("method", ["gzip", "lz4", "zstd", "squashfs"])
def test_boot_run_report_and_exit(method: str, kernel: Path, entries: list[Entry],
                                  guests: list[Guest], tmp_path: Path) -> None:
    line = encode_cmdline("guestapp", SCENARIO, {"GUESTAPP_GREETING": "from the host"},
                          hostname="vm-1", reap_grace=1.0)
    if method == "squashfs":
        # a read-only root: the kernel mounts it and devtmpfs, /etc/hosts comes with the image
        hosts = File(HOSTS_PATH, hosts_text("vm-1").encode())
        initrd = write_squashfs([*entries, hosts], tmp_path / "root.squashfs", "zstd")
        guest = Guest(kernel, None, " ".join([*DISK_ROOT_ARGS, line]), disk=initrd)
    else:
        initrd = write_initramfs(entries, tmp_path / f"initrd.{method}", method)  # type: ignore[arg-type]
        guest = Guest(kernel, initrd, line)
    guests.append(guest)
    ready = guest.read_until(b"uniframe: init ready", 120)
    exited = guest.read_until(b"UNIFRAME-EXIT", 120)
    assert guest.wait(30) == 0, "QEMU should exit by itself after the guest's reboot"
    out = guest.text
    print(f"{method}: initrd {initrd.stat().st_size} bytes, init ready {ready:.1f} s, "
          f"exit {exited:.1f} s after QEMU started")
    assert """guestapp: pid 1 argv ["exit3", "1.0", "machine"] env 'from the host'""" in out
    assert re.search(r"guestapp: orphan \d+ was a zombie\n", out), out
    assert re.search(r"guestapp: orphan \d+ reaped\n", out), out
    assert "guestapp: subprocess statuses [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 5]" in out
    assert "guestapp: hostname vm-1\nguestapp: loopback works\n" in out
    assert "guestapp: localhost is 127.0.0.1\n" in out
    root = "guestapp: root squashfs ro\n" if method == "squashfs" else "guestapp: root rootfs rw\n"
    assert root in out
    assert "uniframe: warning" not in out
    assert "random number generator is not ready" not in out
    skipped = re.findall(r"^uniframe: (/\S*) \(\w+\): skipped", out, re.M)
    # /tmp keeps the image's own files when the closure lives there (a checkout under /tmp)
    image_tmp = any(getattr(e, "path", "").startswith("/tmp/") for e in entries)
    assert skipped in ([], ["/tmp"] if image_tmp else []), f"mounts skipped: {skipped}"
    assert "uniframe: app exited with status 3\nUNIFRAME-EXIT status=3 reason=exited\n" in out
    assert "reboot: Restarting system" in out


def test_console_shutdown_stops_the_app(kernel: Path, entries: list[Entry], guests: list[Guest],
                                        tmp_path: Path) -> None:
    initrd = write_initramfs(entries, tmp_path / "initrd.gz", "gzip")
    guest = Guest(kernel, initrd, encode_cmdline("guestapp", ["sleep", "/tmp/ready"]))
    guests.append(guest)
    guest.read_until(b"uniframe: init ready", 120)
    guest.read_until(b"guestapp: pid 1", 60)
    time.sleep(0.5)
    guest.type(b"uniframe:shutdown\n")
    guest.read_until(b"UNIFRAME-EXIT", 60)
    assert guest.wait(30) == 0
    out = guest.text
    assert "uniframe: app stopped on request (console)" in out
    assert "UNIFRAME-EXIT status=130 reason=interrupted\n" in out
