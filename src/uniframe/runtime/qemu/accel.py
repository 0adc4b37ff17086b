"""Choosing KVM or TCG by booting a probe guest, not by trusting ``/dev/kvm``.

``/dev/kvm`` can exist and still not run our guests: on the development hosts
it is a PVM nested hypervisor on which ordinary guest kernels hang forever.
So KVM is chosen only after a tiny guest (the tailored kernel plus a static
``/init`` that prints a marker and reboots) really printed its marker under KVM
within a deadline; otherwise the VM is killed and TCG is used with a warning.

The verdict is cached in ``<cache>/accel.json`` per host, keyed by what can
change it: QEMU's version, the host kernel release, the CPU model and whether
``/dev/kvm`` exists. ``UNIFRAME_ACCEL=kvm|tcg`` skips the probe.

Without gcc the probe boots the kernel with no initramfs and ``panic=-1``: the
kernel panics ("VFS: Unable to mount root fs") and reboots, and that panic
message on the console proves the kernel ran just as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from uniframe.errors import RuntimeDriverError
from uniframe.paths import cache_dir
from uniframe.runtime.qemu.binary import qemu_binary, qemu_version
from uniframe.runtime.qemu.initramfs import compile_static, init_initramfs
from uniframe.runtime.qemu.microvm import MicroVM

log = logging.getLogger("uniframe.runtime.qemu")

PROBE_MARKER = "UNIFRAME-PROBE-OK"
PANIC_MARKER = "Kernel panic"
PROBE_DEADLINE_S = 8.0

_PROBE_INIT_C = r"""
#include <sys/reboot.h>
#include <unistd.h>
int main(void) {
    static const char marker[] = "\n""UNIFRAME-PROBE-OK\n";
    write(1, marker, sizeof marker - 1);
    reboot(RB_AUTOBOOT);
    for (;;) pause();
}
"""

_warned = False


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator to use and why (shown to users when it is TCG)."""

    name: str            # "kvm" or "tcg"
    reason: str
    cached: bool = False


@dataclass(frozen=True)
class ProbeResult:
    works: bool
    detail: str
    seconds: float


def host_key(qemu: str) -> dict[str, object]:
    """What the KVM verdict depends on; a change to any of these re-probes."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"qemu": qemu_version(qemu), "host_kernel": os.uname().release, "cpu": cpu,
            "dev_kvm": os.path.exists("/dev/kvm")}


def _cache_path() -> Path:
    return cache_dir() / "accel.json"


def _cache_key(key: dict[str, object]) -> str:
    return json.dumps(key, sort_keys=True)


def _read_cache() -> dict[str, dict[str, str]]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: dict[str, object], choice: AccelChoice) -> None:
    data = _read_cache()
    data[_cache_key(key)] = {"accel": choice.name, "reason": choice.reason,
                             "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def probe_initramfs() -> bytes | None:
    """The probe's initramfs, or None when there is no C compiler (panic fallback)."""
    if shutil.which("gcc") is None:
        return None
    try:
        return init_initramfs(compile_static(_PROBE_INIT_C))
    except RuntimeDriverError as exc:
        log.info("probe init does not compile (%s); probing with a kernel panic instead", exc)
        return None


def probe(qemu: str, kernel: Path, accel: str = "kvm", deadline: float | None = None) -> ProbeResult:
    """Boot the probe guest under ``accel``; it works if the marker shows before ``deadline``."""
    started = time.monotonic()
    deadline = deadline or PROBE_DEADLINE_S
    with tempfile.TemporaryDirectory(prefix="uniframe-probe-") as tmp:
        initramfs = probe_initramfs()
        initrd: Path | None = None
        marker = PANIC_MARKER
        cmdline = "console=ttyS0 reboot=t panic=-1"
        if initramfs is not None:
            initrd = Path(tmp) / "initrd"
            initrd.write_bytes(initramfs)
            marker = PROBE_MARKER
        vm = MicroVM(qemu=qemu, kernel=kernel, initrd=initrd, cmdline=cmdline, accel=accel,
                     memory_mib=64, rng=False, tb_size=16)
        return _watch(vm.argv(), marker, deadline, started)


def _watch(argv: list[str], marker: str, deadline: float, started: float) -> ProbeResult:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    seen = b""
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - (time.monotonic() - started)
                if left <= 0:
                    return ProbeResult(False, f"no marker within {deadline:.0f} s (the guest hangs)",
                                       time.monotonic() - started)
                if not sel.select(timeout=left):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    proc.wait(timeout=5)
                    tail = seen.decode(errors="replace").strip().splitlines()[-3:]
                    return ProbeResult(False, f"QEMU exited ({proc.returncode}) before the marker: "
                                       + " | ".join(tail), time.monotonic() - started)
                seen = (seen + chunk)[-65536:]
                if marker.encode() in seen:
                    return ProbeResult(True, "probe guest booted", time.monotonic() - started)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def choose_accel(requested: str = "auto", kernel: Path | None = None,
                 kernel_factory: Callable[[], Path] | None = None) -> AccelChoice:
    """KVM when asked for or proven to work here, else TCG (with a one-time warning).

    ``kernel`` is a kernel to probe with (the image's own is fine); without it
    ``kernel_factory`` is called only if a probe is really needed.
    """
    env = os.environ.get("UNIFRAME_ACCEL", "").strip().lower()
    if requested == "auto" and env in ("kvm", "tcg"):
        return AccelChoice(env, "set by UNIFRAME_ACCEL")
    if requested == "tcg":
        return AccelChoice("tcg", "asked for")
    if requested == "kvm":
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise RuntimeDriverError("--accel kvm: /dev/kvm is missing or not accessible; use --accel tcg or auto")
        return AccelChoice("kvm", "asked for")
    if requested != "auto":
        raise RuntimeDriverError(f"unknown accelerator {requested!r}; use auto, kvm or tcg")
    choice = _auto(kernel, kernel_factory)
    global _warned
    if choice.name == "tcg" and not _warned:
        _warned = True
        log.warning("using TCG emulation, guests run several times slower: %s", choice.reason)
    return choice


def known_choice() -> AccelChoice | None:
    """What ``auto`` would choose, as far as it is known without booting anything; else None.

    For listings (``uniframe runtimes``): the environment override, the cached
    probe verdict, or a ``/dev/kvm`` that is missing or closed to this user.
    None means KVM looks usable but no probe has run here yet; the first
    guest started with ``auto`` probes it. Raises QemuMissingError without QEMU.
    """
    env = os.environ.get("UNIFRAME_ACCEL", "").strip().lower()
    if env in ("kvm", "tcg"):
        return AccelChoice(env, "set by UNIFRAME_ACCEL")
    return _known(host_key(qemu_binary()))


def _known(key: dict[str, object]) -> AccelChoice | None:
    """The verdict that needs no probe: the cached one, or no usable ``/dev/kvm``."""
    cached = _read_cache().get(_cache_key(key))
    if cached and cached.get("accel") in ("kvm", "tcg"):
        return AccelChoice(cached["accel"], cached.get("reason", ""), cached=True)
    if not key["dev_kvm"]:
        return AccelChoice("tcg", "/dev/kvm does not exist")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        # Not cached: permissions are per user and may be fixed any time.
        return AccelChoice("tcg", "/dev/kvm is not accessible to this user (add it to the kvm group)")
    return None


def _auto(kernel: Path | None, kernel_factory: Callable[[], Path] | None) -> AccelChoice:
    qemu = qemu_binary()
    key = host_key(qemu)
    known = _known(key)
    if known is not None:
        if not known.cached and not key["dev_kvm"]:
            _write_cache(key, known)  # recorded like a probe's verdict
        return known
    if kernel is None:
        if kernel_factory is None:
            raise RuntimeDriverError("cannot probe KVM without a kernel")
        kernel = kernel_factory()
    result = probe(qemu, kernel)
    if result.works:
        choice = AccelChoice("kvm", f"probe guest booted under KVM in {result.seconds:.1f} s")
    else:
        choice = AccelChoice("tcg", f"/dev/kvm is present but a probe guest failed under KVM: {result.detail}")
    _write_cache(key, choice)
    return choice
