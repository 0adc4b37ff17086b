"""Unikernel figures: kernel, image size, files, executables, boot to first inference, QEMU RSS.

Run: ``python bench/unikernel_bench.py [--runs 5] [--requests 1000] [--compression lz4,zstd]``.

For each initramfs compression it builds the iris service (the same spec as
examples/iris/service.yaml) into a unikernel, boots it ``--runs`` times
under the accelerator the runtime picks (TCG on these machines) and reports
the median time from launching QEMU to the first successful inference, then
sends ``--requests`` requests to one booted VM and reads QEMU's RSS.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from uniframe.build.examples import write_iris
from uniframe.build.kernel import ensure_kernel
from uniframe.build.store import ImageStore
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
  image: {{compression: {c}}}
"""
BODY = json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                               "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(port: int, n: int, name: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(n):
        conn.request("POST", f"/v2/models/{name}/infer", BODY, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200
    conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--compression", default="none,gzip,lz4,zstd")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    console = Console()
    kernel = ensure_kernel()
    work = Path(tempfile.mkdtemp(prefix="uniframe-bench-"))
    write_iris(work)
    store = ImageStore(work / "images")
    driver = QemuMicroVMDriver(root=work / "replicas")
    rows: list[dict[str, Any]] = []
    for c in args.compression.split(","):
        spec_file = work / f"{c}.yaml"
        spec_file.write_text(SPEC.format(c=c))
        (doc,) = load_file(spec_file)
        assert isinstance(doc.spec, InferenceService)
        t = time.monotonic()
        result = build_unikernel(doc.spec, source_digest=doc.digest(), store=store, kernel=kernel)
        build_s = time.monotonic() - t
        image = result.image
        body = sample_request(image.manifest["model"]["inputs"])
        times = []
        for _ in range(args.runs):
            proof = boot_and_infer(image, body, driver=driver)
            times.append(proof.seconds_to_first_inference)
        keep = boot_and_infer(image, body, driver=driver, keep=True)
        replica = driver.get(keep.replica_id)
        port = replica.config.ports[0].host_port
        assert replica.pid is not None
        rss_boot = rss_mib(replica.pid)
        load(port, args.requests, image.manifest["model"]["name"])
        rss_after = rss_mib(replica.pid)
        driver.stop(replica.id, timeout=15)
        driver.remove(replica.id, force=True)
        m = image.manifest
        rows.append({
            "compression": c, "accel": proof.accel, "build_s": build_s,
            "kernel_bytes": m["files"]["kernel"]["size"], "initrd_bytes": m["files"]["initrd"]["size"],
            "image_bytes": image.size_bytes(), "unpacked_bytes": m["initrd"]["uncompressed_bytes"],
            "files": m["file_count"], "executables": len(m["executables"]),
            "first_inference_s": times, "median_s": statistics.median(times),
            "rss_boot_mib": rss_boot, "rss_after_mib": rss_after,
        })
    table = Table(title=f"iris unikernel, {args.runs} boots each ({rows[0]['accel'] if rows else '?'}), "
                        f"kernel {kernel.key} ({kernel.options_enabled} options)")
    for col in ("compression", "image on disk", "kernel", "initrd", "unpacked", "files", "executables",
                "QEMU start → first inference (median, min-max)",
                f"QEMU RSS boot / after {args.requests} req", "build"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["compression"], f"{r['image_bytes'] / 1e6:.1f} MB", f"{r['kernel_bytes'] / 1e6:.2f} MB",
            f"{r['initrd_bytes'] / 1e6:.1f} MB", f"{r['unpacked_bytes'] / 1e6:.1f} MB", str(r["files"]),
            str(r["executables"]),
            f"{r['median_s']:.2f} s ({min(r['first_inference_s']):.2f}-{max(r['first_inference_s']):.2f})",
            f"{r['rss_boot_mib']:.0f} / {r['rss_after_mib']:.0f} MiB", f"{r['build_s']:.1f} s")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
