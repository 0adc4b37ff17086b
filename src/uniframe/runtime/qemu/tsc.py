"""The host's TSC rate, which a TCG guest's kernel should be told rather than measure.

Under TCG the guest's RDTSC returns the host's TSC (QEMU reads it with RDTSC),
so the guest's TSC ticks at the host's rate. The guest kernel measures that
rate against the emulated PIT, but on a busy host the emulated CPU runs too
unevenly for it: in 2 of 10 boots at load 3 the calibration failed, the kernel
marked the TSC unstable, spent ~0.25 s calibrating a delay loop instead and
kept time with jiffies (4 ms steps that fall behind when the emulated CPU is
slow: the app's clocks and latency figures go wrong). ``tsc_early_khz=`` on
the kernel command line hands it the rate: 10 of 10 boots then kept the TSC.

The rate is measured here, RDTSC against ``CLOCK_MONOTONIC_RAW`` twice over 25 ms.
Python has no RDTSC, so four instructions go into an executable page called
through ctypes. A host that is not x86-64, whose TSC is not constant, or that
forbids executable anonymous memory gets ``None``, and the guest calibrates
as before.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import time
from collections.abc import Callable
from pathlib import Path

# rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC_CODE = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")
_WINDOW_S = 0.025
_AGREE = 1e-3  # two measurements further apart than this are not trusted


def _constant_tsc(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return "constant_tsc" in flags and "nonstop_tsc" in flags
    return False


def _stamp(rdtsc: Callable[[], int]) -> tuple[int, int]:
    """(TSC, nanoseconds) read as close together as five tries allow."""
    best: tuple[int, int, int] | None = None
    for _ in range(5):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
        tsc = rdtsc()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
        if best is None or after - before < best[2]:
            best = (tsc, (before + after) // 2, after - before)
    assert best is not None
    return best[0], best[1]


def measure_tsc_khz() -> int | None:
    """The host's TSC rate in kHz, measured now, or None where it cannot be or is not stable."""
    if platform.machine() not in ("x86_64", "AMD64") or not _constant_tsc():
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        return None
    with page:
        page.write(_RDTSC_CODE)
        anchor = ctypes.c_char.from_buffer(page)
        rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(anchor))
        rates = []
        for _ in range(2):
            tsc0, ns0 = _stamp(rdtsc)
            time.sleep(_WINDOW_S)
            tsc1, ns1 = _stamp(rdtsc)
            rates.append((tsc1 - tsc0) * 1e6 / (ns1 - ns0))
        del rdtsc, anchor  # the page cannot be unmapped while ctypes points into it
    if min(rates) <= 0 or (max(rates) - min(rates)) / min(rates) > _AGREE:
        return None
    return round(sum(rates) / len(rates))


@functools.cache
def host_tsc_khz() -> int | None:
    """:func:`measure_tsc_khz`, once per process."""
    return measure_tsc_khz()
