"""Kernel figures: build time, sizes, options, and boot-to-marker time under TCG.

Boots each image of the cached kernel (building it first if needed) with the
probe initramfs from tests/images/test_kernel.py and reports the median of N
boots, interleaved so that load from other work on the machine hits every
variant alike; QEMU's CPU time (user + system, to exit) is printed beside the
wall time because it is less sensitive to that load. The ``+tsc`` rows pass the host's TSC frequency on the kernel
command line (``tsc_early_khz=``): under TCG the guest's TSC calibration
against the PIT often fails, the kernel falls back to the delay loop and
jiffies, and boots take longer and vary more.

    python bench/kernel_bench.py [--boots 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from uniframe.build.kernel import Kernel, ensure_kernel

REPO = Path(__file__).resolve().parent.parent


def _probe_helpers() -> ModuleType:
    """The boot helpers live with the boot tests; load them from there."""
    path = REPO / "tests" / "images" / "test_kernel.py"
    spec = importlib.util.spec_from_file_location("kernel_boot_probe", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def host_tsc_khz() -> int | None:
    """The host TSC frequency, which TCG guests read through RDTSC."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boots", type=int, default=5, help="boots per variant (median)")
    args = parser.parse_args()

    kernel = ensure_kernel(progress=_progress())
    probe = _probe_helpers()
    assert kernel.vmlinux is not None and kernel.bzimage is not None
    khz = host_tsc_khz()
    variants: dict[str, tuple[Path, str]] = {
        "PVH vmlinux": (kernel.vmlinux, "quiet"),
        "bzImage": (kernel.bzimage, "quiet"),
    }
    if khz:
        variants["PVH vmlinux +tsc"] = (kernel.vmlinux, f"quiet tsc_early_khz={khz}")
        variants["bzImage +tsc"] = (kernel.bzimage, f"quiet tsc_early_khz={khz}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        initrd = probe.probe_initramfs(Path(tmp))
        for _ in range(args.boots):
            for name, (image, append) in variants.items():
                result = probe.boot(probe.qemu_argv(image, initrd, append=append), deadline=90)
                if result.marker_seconds is None:
                    raise SystemExit(f"{name}: no marker; output:\n{result.output[-2000:]}")
                times[name].append(result.marker_seconds)
                cpu[name].append(result.cpu_seconds)
    _print(kernel, times, cpu)


def _progress() -> Callable[[str, str], None]:
    seen: set[str] = set()

    def report(step: str, line: str) -> None:
        if step not in seen:
            seen.add(step)
            print(f"kernel: {line}", file=sys.stderr)

    return report


def _print(kernel: Kernel, times: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
    assert kernel.vmlinux is not None and kernel.bzimage is not None
    rows = [
        ("kernel key", kernel.key),
        ("source", kernel.source_version),
        ("build time (2 cores incl. unpack)", f"{kernel.build_seconds:.0f} s"),
        ("vmlinux (stripped, PVH)", _size(kernel.vmlinux)),
        ("bzImage", _size(kernel.bzimage)),
        ("options enabled (=y)", str(kernel.options_enabled)),
        ("default boot", kernel.boot),
    ]
    for name, samples in times.items():
        spread = f"min {min(samples):.2f}, max {max(samples):.2f}"
        rows.append((f"boot to marker, {name}",
                     f"{statistics.median(samples):.2f} s median of {len(samples)} ({spread}); "
                     f"QEMU CPU {statistics.median(cpu[name]):.2f} s"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1048576:.2f} MiB ({size:,} bytes)"


if __name__ == "__main__":
    main()
