"""The tailored kernel: keys, option verification, the cache, and real boots under QEMU.

The boot tests build the real kernel (once, into the user's cache) and boot it
under TCG with a tiny initramfs whose /init is a static C program compiled
here. That program checks, from inside the guest, what the config fragment
promises (mounts, devices, system calls, ip=, #! scripts, entropy) and prints
one marker line before rebooting, which makes QEMU exit (``reboot=t`` plus
``-no-reboot``). The boot helpers are shared with ``bench/kernel_bench.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import selectors
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from uniframe.build.kernel import (
    Kernel,
    cache_root,
    default_fragment_text,
    ensure_kernel,
    kernel_key,
    user_kernel,
    verify_options,
)
from uniframe.build.kernel.builder import BuildOutput, check_tools
from uniframe.build.kernel.kconfig import parse_options
from uniframe.errors import BuildError

MARKER = "UNIFRAME-BOOT-OK"

# PID 1 of the probe initramfs. Run as an interpreter (argv[1] = a script) it only
# proves that BINFMT_SCRIPT handed it the script, by exiting 42.
INIT_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <net/if.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/random.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <signal.h>
#include <unistd.h>
#include <linux/futex.h>

static int ok(int rc) { return rc >= 0; }

/* First word of a small text file, or "-" if it cannot be read. */
static void first_word(const char *path, char *out, size_t size) {
    FILE *f = fopen(path, "r");
    if (f == NULL || fscanf(f, "%63s", out) != 1) snprintf(out, size, "-");
    if (f != NULL) fclose(f);
}

int main(int argc, char **argv) {
    if (argc > 1) return 42;
    int mounts = ok(mount("devtmpfs", "/dev", "devtmpfs", 0, NULL))
               + ok(mount("proc", "/proc", "proc", 0, NULL))
               + ok(mount("sysfs", "/sys", "sysfs", 0, NULL))
               + ok(mount("tmpfs", "/tmp", "tmpfs", 0, NULL));
    char buf[16];
    ssize_t rnd = getrandom(buf, sizeof buf, GRND_NONBLOCK);
    sigset_t set; sigemptyset(&set); sigaddset(&set, SIGUSR1);
    int futex_word = 0;
    int calls = ok(epoll_create1(0)) + ok(eventfd(0, 0))
              + ok(timerfd_create(CLOCK_MONOTONIC, 0)) + ok(signalfd(-1, &set, 0))
              + ok(inotify_init1(0))
              + ok(syscall(SYS_futex, &futex_word, FUTEX_WAKE, 1, NULL, NULL, 0))
              + ok(socket(AF_INET, SOCK_STREAM, 0)) + ok(socket(AF_INET, SOCK_DGRAM, 0))
              + ok(socket(AF_UNIX, SOCK_STREAM, 0));
    int script = -1;
    pid_t child = fork();
    if (child == 0) {
        char *args[] = {"/probe.sh", NULL};
        execv("/probe.sh", args);
        _exit(1);
    }
    int status = 0;
    if (child > 0 && waitpid(child, &status, 0) == child && WIFEXITED(status))
        script = WEXITSTATUS(status);
    char addr[INET_ADDRSTRLEN] = "none";
    struct ifreq ifr; memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, "eth0", IFNAMSIZ - 1);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s >= 0 && ioctl(s, SIOCGIFADDR, &ifr) == 0)
        inet_ntop(AF_INET, &((struct sockaddr_in *)&ifr.ifr_addr)->sin_addr, addr, sizeof addr);
    char rng[64];
    first_word("/sys/class/misc/hw_random/rng_current", rng, sizeof rng);
    printf("%s cpus=%ld random=%zd mounts=%d calls=%d script=%d net=%d blk=%d rng=%s hvc=%d"
           " addr=%s\n", "UNIFRAME-BOOT-OK", sysconf(_SC_NPROCESSORS_ONLN), rnd, mounts, calls,
           script, access("/sys/class/net/eth0", F_OK) == 0, access("/sys/block/vda", F_OK) == 0,
           rng, access("/dev/hvc0", F_OK) == 0, addr);
    fflush(stdout);
    sync();
    reboot(RB_AUTOBOOT);
    return 1;
}
"""


# --- helpers shared with bench/kernel_bench.py ------------------------------

def compile_init(directory: Path) -> Path:
    """Compile INIT_C statically (the initramfs has no libc)."""
    source = directory / "init.c"
    source.write_text(INIT_C)
    binary = directory / "init"
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(binary), str(source)], check=True)
    return binary


def newc_archive(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A cpio 'newc' archive of (name, mode, data, (rdev major, minor)) without needing root."""
    out = bytearray()

    def add(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        add(ino, name, mode, data, rdev)
    add(0, "TRAILER!!!", 0, b"", (0, 0))
    return bytes(out)


def probe_initramfs(directory: Path, compression: str = "gzip") -> Path:
    """The probe initramfs: /init, a #! script for it, mount points and /dev/console."""
    init = compile_init(directory).read_bytes()
    directory_mode, char_mode = 0o040755, 0o020600
    raw = newc_archive([
        ("dev", directory_mode, b"", (0, 0)),
        ("dev/console", char_mode, b"", (5, 1)),
        ("proc", directory_mode, b"", (0, 0)),
        ("sys", directory_mode, b"", (0, 0)),
        ("tmp", directory_mode, b"", (0, 0)),
        ("init", 0o100755, init, (0, 0)),
        ("probe.sh", 0o100755, b"#!/init\n", (0, 0)),
    ])
    path = directory / f"initramfs.cpio.{compression}"
    if compression == "gzip":
        path.write_bytes(gzip.compress(raw, mtime=0))
    else:  # the kernel's lz4 decompressor reads the legacy frame format (-l)
        argv = {"lz4": ["lz4", "-l", "-q", "-c"], "zstd": ["zstd", "-q", "-c"]}[compression]
        path.write_bytes(subprocess.run(argv, input=raw, capture_output=True, check=True).stdout)
    return path


@dataclass
class Boot:
    marker_seconds: float | None   # QEMU start to the marker line on the serial port
    exit_seconds: float | None     # QEMU start to QEMU exiting by itself
    cpu_seconds: float | None      # QEMU's user + system CPU time, for comparisons on a busy host
    returncode: int | None
    output: str

    def facts(self) -> dict[str, str]:
        line = next(x for x in self.output.splitlines() if x.startswith(MARKER))
        return dict(item.split("=", 1) for item in line.split()[1:])


def qemu_argv(kernel: Path, initrd: Path, *, smp: int = 1, append: str = "",
              devices: list[str] | None = None) -> list[str]:
    return ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "tcg", "-cpu", "max",
            "-m", "128", "-smp", str(smp), "-nodefaults", "-no-user-config", "-nographic",
            "-no-reboot", "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 reboot=t panic=-1 {append}".strip(), *(devices or [])]


def boot(argv: list[str], *, deadline: float = 90.0) -> Boot:
    """Run QEMU until it exits by itself or ``deadline`` passes (then kill it)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    output = bytearray()
    marker_at: float | None = None
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while (remaining := started + deadline - time.monotonic()) > 0:
            if sel.select(timeout=min(remaining, 0.5)):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                output.extend(chunk)
                if marker_at is None and MARKER.encode() + b" " in output:
                    marker_at = time.monotonic() - started
            elif proc.poll() is not None:
                break
    exited_at, code, cpu = _reap(proc, started + deadline)
    if exited_at is not None:
        exited_at -= started
    proc.stdout.close()
    return Boot(marker_at, exited_at, cpu, code, output.decode(errors="replace"))


def _reap(proc: subprocess.Popen[bytes], until: float) -> tuple[float | None, int | None, float]:
    """Wait for QEMU with wait4 (for its CPU time); kill it at ``until``."""
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, 0 if killed else os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            cpu = usage.ru_utime + usage.ru_stime
            return (None, None, cpu) if killed else (time.monotonic(), proc.returncode, cpu)
        if time.monotonic() >= until:
            proc.kill()
            killed = True
        else:
            time.sleep(0.01)


# --- unit tests ---------------------------------------------------------------

def test_key_depends_on_source_version_and_options_only() -> None:
    fragment = default_fragment_text()
    key = kernel_key("linux-source-6.1 6.1.192-2", fragment)
    assert key == kernel_key("linux-source-6.1 6.1.192-2", fragment)
    assert key != kernel_key("linux-source-6.1 6.1.193-1", fragment)
    assert key != kernel_key("linux-source-6.1 6.1.192-2", fragment + "CONFIG_IPV6=y\n")
    assert key != kernel_key("linux-source-6.1 6.1.192-2", fragment.replace(
        "CONFIG_RD_ZSTD=y", "# CONFIG_RD_ZSTD is not set"))
    # comments do not change what gets built
    assert key == kernel_key("linux-source-6.1 6.1.192-2", "# a note\n" + fragment)
    assert len(key) == 16


def test_verify_options_names_what_kconfig_dropped() -> None:
    fragment = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_N=8\n"
    good = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_N=8\nCONFIG_OTHER=y\n"
    verify_options(fragment, good)
    verify_options(fragment, good.replace("# CONFIG_C is not set\n", ""))  # absent = not set
    bad = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_N=64\n"
    with pytest.raises(BuildError) as err:
        verify_options(fragment, bad, where="frag.config")
    message = str(err.value)
    for wanted in ("CONFIG_B: wanted =y, got not set", "CONFIG_C: wanted not set, got =y",
                   "CONFIG_N: wanted =8, got =64", "frag.config", "depends on"):
        assert wanted in message
    assert "CONFIG_A" not in message


def test_default_fragment_asks_for_the_microvm_essentials() -> None:
    wanted = parse_options(default_fragment_text())
    for option in ("64BIT", "SMP", "PVH", "VIRTIO_MMIO", "VIRTIO_MMIO_CMDLINE_DEVICES",
                   "VIRTIO_NET", "VIRTIO_BLK", "VIRTIO_CONSOLE", "HW_RANDOM_VIRTIO",
                   "SERIAL_8250_CONSOLE", "DEVTMPFS_MOUNT", "TMPFS", "BINFMT_ELF",
                   "BINFMT_SCRIPT", "FUTEX", "EPOLL", "IP_PNP", "UNIX", "BLK_DEV_INITRD",
                   "RD_GZIP", "RD_LZ4", "RD_ZSTD", "RANDOM_TRUST_CPU"):
        assert wanted.get(f"CONFIG_{option}") == "y", option
    for option in ("MODULES", "PCI", "ACPI", "RD_XZ", "RD_BZIP2", "RD_LZO", "IPV6"):
        assert wanted.get(f"CONFIG_{option}", "absent") is None, option


@pytest.fixture
def fake_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache and a stand-in source tarball: cache tests need no linux-source."""
    monkeypatch.setenv("UNIFRAME_CACHE", str(tmp_path / "cache"))
    tarball = tmp_path / "linux-fake.tar.xz"
    tarball.write_bytes(b"not really linux")
    monkeypatch.setenv("UNIFRAME_KERNEL_SOURCE", str(tarball))
    return tarball


class FakeBuilder:
    """Writes stand-in files instead of compiling; counts calls, can fail or dawdle."""

    def __init__(self, *, fail: bool = False, delay: float = 0.0) -> None:
        self.calls = 0
        self.fail = fail
        self.delay = delay

    def __call__(self, source: Path, fragment_text: str, where: str, work: Path, out: Path, *,
                 jobs: int, progress: object, log: Path) -> BuildOutput:
        self.calls += 1
        time.sleep(self.delay)
        out.mkdir()
        (out / "vmlinux").write_bytes(b"vmlinux")
        if self.fail:
            raise BuildError("compiler exploded")
        (out / "bzImage").write_bytes(b"bzImage")
        (out / "config").write_text(fragment_text + "CONFIG_EXTRA=y\n")
        return BuildOutput(vmlinux=out / "vmlinux", bzimage=out / "bzImage",
                           config=out / "config", options_enabled=7)


def test_cache_builds_once_then_returns_the_same_kernel_instantly(fake_source: Path) -> None:
    builder = FakeBuilder()
    first = ensure_kernel(_builder=builder)
    started = time.monotonic()
    second = ensure_kernel(_builder=builder)
    assert time.monotonic() - started < 1.0
    assert builder.calls == 1
    assert second == first
    entry = cache_root() / first.key
    assert first.path == entry / "vmlinux" and first.bzimage == entry / "bzImage"
    meta = json.loads((entry / "kernel.json").read_text())
    assert meta["key"] == first.key and meta["options_enabled"] == 7
    assert first.config_hash == hashlib.sha256(
        (entry / "config").read_bytes()).hexdigest()
    # a forced rebuild replaces the entry in place
    forced = ensure_kernel(_builder=builder, force=True)
    assert builder.calls == 2 and forced.key == first.key
    assert sorted(p.name for p in cache_root().iterdir()) == [first.key, f"{first.key}.lock"]


def test_a_failed_build_leaves_no_cache_entry(fake_source: Path) -> None:
    with pytest.raises(BuildError, match="compiler exploded"):
        ensure_kernel(_builder=FakeBuilder(fail=True))
    leftovers = [p.name for p in cache_root().iterdir() if not p.name.endswith((".lock", ".log"))]
    assert leftovers == []
    builder = FakeBuilder()
    ensure_kernel(_builder=builder)
    assert builder.calls == 1


def test_concurrent_requests_build_once(fake_source: Path) -> None:
    builder = FakeBuilder(delay=0.5)
    results: list[Kernel] = []
    waits: list[str] = []

    def want() -> None:
        results.append(ensure_kernel(_builder=builder,
                                     progress=lambda step, line: waits.append(step)))

    threads = [threading.Thread(target=want) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builder.calls == 1
    assert len(results) == 2 and results[0] == results[1]
    assert "wait" in waits


def test_missing_source_says_how_to_install_it(fake_source: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIFRAME_KERNEL_SOURCE", str(fake_source.parent / "absent.tar.xz"))
    with pytest.raises(BuildError, match=r"apt-get install linux-source-6\.1"):
        ensure_kernel(_builder=FakeBuilder())


def test_missing_tools_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH with every build tool except flex and bison."""
    for tool in ("make", "gcc", "ld", "objcopy", "bc", "perl", "tar", "xz"):
        found = shutil.which(tool)
        assert found is not None, tool
        (tmp_path / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BuildError) as err:
        check_tools()
    assert "needs bison, flex, not found" in str(err.value)
    assert "apt-get install bison flex" in str(err.value)


def test_user_kernel_recognises_bzimage_and_rejects_the_rest(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="does not exist"):
        user_kernel(tmp_path / "nope")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(BuildError, match="neither a bzImage nor an ELF"):
        user_kernel(junk)
    elf = tmp_path / "plain.elf"
    shutil.copyfile(sys.executable, elf)  # an ELF, but no PVH note
    with pytest.raises(BuildError, match="without a PVH entry note"):
        user_kernel(elf)
    header = bytearray(4096)
    header[0x1FE:0x200] = b"\x55\xaa"
    header[0x202:0x206] = b"HdrS"
    bz = tmp_path / "bzImage"
    bz.write_bytes(bytes(header))
    kernel = user_kernel(bz)
    assert kernel.boot == "bzimage" and kernel.path == bz and kernel.key.startswith("user-")


def test_cli_info_without_a_built_kernel_is_a_clear_error(fake_source: Path) -> None:
    proc = subprocess.run(["uniframe", "kernel", "info"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "uniframe kernel build" in proc.stderr and "Traceback" not in proc.stderr


# --- the real kernel -------------------------------------------------------------

@pytest.fixture(scope="session")
def built_kernel() -> Kernel:
    """The real kernel from the user's cache (built once, about 3 minutes on 2 cores)."""
    return ensure_kernel()


@pytest.mark.slow
def test_real_build_is_small_verified_and_cached(built_kernel: Kernel) -> None:
    kernel = built_kernel
    assert kernel.bzimage is not None and kernel.vmlinux is not None
    assert kernel.config_path is not None and kernel.options_enabled is not None
    bz_size = kernel.bzimage.stat().st_size
    print(f"\nkernel {kernel.key}: vmlinux {kernel.vmlinux.stat().st_size} B, "
          f"bzImage {bz_size} B, {kernel.options_enabled} options, "
          f"built in {kernel.build_seconds} s")
    assert bz_size <= 2 * 1024 * 1024
    config = kernel.config_path.read_text()
    verify_options(default_fragment_text(), config)
    assert hashlib.sha256(config.encode()).hexdigest() == kernel.config_hash
    assert kernel.options_enabled == sum(1 for v in parse_options(config).values() if v == "y")
    assert user_kernel(kernel.vmlinux).boot == "pvh"
    assert user_kernel(kernel.bzimage).boot == "bzimage"
    started = time.monotonic()
    again = ensure_kernel()
    assert time.monotonic() - started < 1.0
    assert again == kernel


@pytest.mark.slow
def test_cli_info_json_describes_the_built_kernel(built_kernel: Kernel) -> None:
    proc = subprocess.run(["uniframe", "kernel", "info", "-o", "json"],
                          capture_output=True, text=True, check=True)
    info = json.loads(proc.stdout)
    assert info["key"] == built_kernel.key
    assert info["path"] == str(built_kernel.path)
    assert info["options_enabled"] == built_kernel.options_enabled
    assert info["config_hash"] == built_kernel.config_hash


@pytest.mark.slow
def test_an_option_with_unmet_dependencies_fails_the_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real Kconfig: VIRTIO_PCI needs PCI, which the fragment turns off."""
    monkeypatch.setenv("UNIFRAME_CACHE", str(tmp_path / "cache"))
    fragment = tmp_path / "frag.config"
    fragment.write_text(default_fragment_text() + "CONFIG_VIRTIO_PCI=y\n")
    with pytest.raises(BuildError, match="CONFIG_VIRTIO_PCI: wanted =y, got not set"):
        ensure_kernel(fragment=fragment)
    assert [p.name for p in cache_root().iterdir() if not p.name.endswith((".lock", ".log"))] == []


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["pvh", "bzimage"])
def test_boot_to_marker_and_exit(built_kernel: Kernel, tmp_path: Path, protocol: str) -> None:
    image = built_kernel.vmlinux if protocol == "pvh" else built_kernel.bzimage
    assert image is not None
    result = boot(qemu_argv(image, probe_initramfs(tmp_path)), deadline=90)
    print(f"\n{protocol}: marker after {result.marker_seconds} s, "
          f"QEMU exited after {result.exit_seconds} s, QEMU CPU {result.cpu_seconds} s")
    assert result.marker_seconds is not None, result.output[-3000:]
    assert result.exit_seconds is not None and result.returncode == 0, result.output[-3000:]
    facts = result.facts()
    assert facts["mounts"] == "4" and facts["calls"] == "9" and facts["script"] == "42", facts
    assert int(facts["random"]) == 16, "getrandom would block: the CRNG is not ready"
    assert facts["net"] == "0" and facts["rng"] == "none", "no devices were given"


@pytest.mark.qemu
@pytest.mark.slow
def test_boot_with_virtio_devices_smp_and_ip_autoconfig(built_kernel: Kernel,
                                                        tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 1024 * 1024)
    devices = ["-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0",
               "-drive", f"file={disk},format=raw,if=none,id=d0",
               "-device", "virtio-blk-device,drive=d0",
               "-device", "virtio-rng-device",
               "-chardev", "null,id=vc0", "-device", "virtio-serial-device",
               "-device", "virtconsole,chardev=vc0"]
    argv = qemu_argv(built_kernel.path, probe_initramfs(tmp_path), smp=2, devices=devices,
                     append="ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off")
    result = boot(argv, deadline=120)
    assert result.marker_seconds is not None, result.output[-3000:]
    assert result.returncode == 0, result.output[-3000:]
    facts = result.facts()
    assert facts["cpus"] == "2"
    assert (facts["net"], facts["blk"], facts["hvc"]) == ("1", "1", "1"), facts
    assert facts["rng"].startswith("virtio_rng"), facts
    assert facts["addr"] == "10.0.2.15"


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_initramfs_decompressors(built_kernel: Kernel, tmp_path: Path, compression: str) -> None:
    result = boot(qemu_argv(built_kernel.path, probe_initramfs(tmp_path, compression)))
    assert result.marker_seconds is not None, result.output[-3000:]
    assert result.returncode == 0
