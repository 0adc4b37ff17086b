"""Unikernel figures: kernel, image size, files, executables, boot to first inference, QEMU RSS.

Run: ``python bench/unikernel_bench.py [--runs 5] [--requests 1000] [--compression lz4,zstd]``.

For each initramfs compression it builds the iris service (the same spec as
examples/iris/service.yaml) into a unikernel, boots it ``--runs`` times
under the accelerator the runtime picks (TCG on these machines) and reports
the median time from launching QEMU to the first successful inference, with
the CPU time QEMU used until then (the wall time stretches when other work
shares the cores; the CPU time much less). The last boot then answers
``--requests`` requests, and QEMU's RSS is read right after the first
inference and after the requests, split into anonymous memory (guest RAM and
the TCG code cache) and file pages (QEMU keeps the initrd file mapped).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from uniframe.build.examples import write_iris
from uniframe.build.initramfs import METHODS, Method
from uniframe.build.kernel import ensure_kernel
from uniframe.build.store import Image, ImageStore
from uniframe.build.unikernel import build_unikernel, sample_request
from uniframe.runtime.qemu.driver import QemuMicroVMDriver
from uniframe.runtime.verify import boot_and_infer
from uniframe.spec import InferenceService, load_file

SPEC = """\
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {{name: iris-{c}}}
spec:
  model: {{uri: ./iris.onnx}}
  resources: {{cpus: 1, memory: 256Mi}}
"""
BODY = json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                               "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
DEFAULT_NICE = -10 if os.geteuid() == 0 else 0


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and its parts (RssAnon, RssFile, RssShmem) in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) / 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(port: int, n: int, name: str) -> float:
    """Send ``n`` requests over one keep-alive connection; return requests per second."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    t = time.monotonic()
    for _ in range(n):
        conn.request("POST", f"/v2/models/{name}/infer", BODY, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"request answered {r.status}")
    conn.close()
    return n / (time.monotonic() - t)


def boot_once(image: Image, driver: QemuMicroVMDriver, requests: int) -> dict[str, Any]:
    """Boot to the first inference (wall and QEMU CPU time); optionally load it and read RSS."""
    body = sample_request(image.manifest["model"]["inputs"])
    proof = boot_and_infer(image, body, driver=driver, keep=True)
    replica = driver.get(proof.replica_id)
    try:
        assert replica.pid is not None
        run: dict[str, Any] = {"seconds": proof.seconds_to_first_inference,
                               "cpu_seconds": cpu_seconds(replica.pid), "accel": proof.accel}
        if requests:
            run["rss_boot"] = memory_mib(replica.pid)
            port = replica.config.ports[0].host_port
            run["requests_per_second"] = load(port, requests, image.manifest["model"]["name"])
            run["rss_after"] = memory_mib(replica.pid)
        return run
    finally:
        driver.stop(replica.id, timeout=15)
        driver.remove(replica.id, force=True)


def measure(c: Method, work: Path, store: ImageStore, driver: QemuMicroVMDriver,
            runs: int, requests: int) -> dict[str, Any]:
    spec_file = work / f"{c}.yaml"
    spec_file.write_text(SPEC.format(c=c))
    (doc,) = load_file(spec_file)
    assert isinstance(doc.spec, InferenceService)
    t = time.monotonic()
    result = build_unikernel(doc.spec, source_digest=doc.digest(), compression=c, store=store)
    build_s = time.monotonic() - t
    image = result.image
    load_before = os.getloadavg()
    boots = [boot_once(image, driver, requests if i == runs - 1 else 0) for i in range(runs)]
    m = image.manifest
    return {
        "compression": c, "accel": boots[0]["accel"], "build_s": build_s,
        "kernel_bytes": m["files"]["kernel"]["size"], "initrd_bytes": m["files"]["initrd"]["size"],
        "image_bytes": image.size_bytes(), "unpacked_bytes": m["initrd"]["uncompressed_bytes"],
        "files": m["file_count"], "executables": len(m["executables"]),
        "boots": boots,
        "median_s": statistics.median(b["seconds"] for b in boots),
        "median_cpu_s": statistics.median(b["cpu_seconds"] for b in boots),
        "rss_boot": boots[-1].get("rss_boot", {}), "rss_after": boots[-1].get("rss_after", {}),
        "requests_per_second": boots[-1].get("requests_per_second"),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }


def table(rows: list[dict[str, Any]], runs: int, requests: int, title: str) -> Table:
    t = Table(title=title)
    for col in ("compression", "image (kernel + initrd)", "unpacked", "files", "executables",
                "QEMU start → 1st inference, median (min-max)", "QEMU CPU until then",
                f"QEMU RSS boot / after {requests} req (anon + file)", "load", "build"):
        t.add_column(col)
    for r in rows:
        times = [b["seconds"] for b in r["boots"]]
        after = r["rss_after"]
        t.add_row(
            r["compression"],
            f"{r['image_bytes'] / 1e6:.1f} MB ({r['kernel_bytes'] / 1e6:.2f} + {r['initrd_bytes'] / 1e6:.1f})",
            f"{r['unpacked_bytes'] / 1e6:.1f} MB", str(r["files"]), str(r["executables"]),
            f"{r['median_s']:.2f} s ({min(times):.2f}-{max(times):.2f})",
            f"{r['median_cpu_s']:.2f} s",
            f"{r['rss_boot'].get('VmRSS', float('nan')):.0f} / {after.get('VmRSS', float('nan')):.0f} MiB "
            f"({after.get('RssAnon', float('nan')) + after.get('RssShmem', 0):.0f} + "
            f"{after.get('RssFile', float('nan')):.0f})",
            f"{r['loadavg_before'][0]:.1f}-{r['loadavg_after'][0]:.1f}", f"{r['build_s']:.0f} s")
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--compression", default=",".join(METHODS))
    ap.add_argument("--nice", type=int, default=DEFAULT_NICE,
                    help="niceness of the bench and the QEMUs it starts (default -10 as root, else 0)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the images and replica logs")
    args = ap.parse_args()
    methods = [c for c in args.compression.split(",") if c]
    for c in methods:
        if c not in METHODS:
            ap.error(f"--compression {c!r}: use one of {', '.join(METHODS)}")
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # QEMU inherits it
    console = Console(width=200)  # one line per row, also when the output goes to a file
    kernel = ensure_kernel()
    work = Path(tempfile.mkdtemp(prefix="uniframe-bench-"))
    try:
        write_iris(work)
        store = ImageStore(work / "images")
        driver = QemuMicroVMDriver(root=work / "replicas")
        rows = []
        for c in methods:
            console.print(f"[dim]{c}: building, then {args.runs} boots[/dim]", highlight=False)
            rows.append(measure(c, work, store, driver, args.runs, args.requests))
    finally:
        if args.keep:
            console.print(f"images and replica logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    accel = rows[0]["accel"] if rows else "?"
    console.print(table(rows, args.runs, args.requests,
                        f"iris unikernel, {args.runs} boots each ({accel}, nice {args.nice}), "
                        f"kernel {kernel.key} ({kernel.options_enabled} options)"))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
