"""Cold starts of the iris unikernel: boot vs restore from a snapshot template, and memory.

Run: ``python bench/coldstart_bench.py [--runs 5] [--clones 1,4] [--accel tcg]``.

It builds the iris service (the same spec as examples/iris/service.yaml) as a
unikernel once, boots one snapshottable replica, sends it one warm-up
inference and snapshots it into a template (as the control plane does for
the first ready replica of an autoscaled revision, control/templates.py),
then measures, ``--runs`` times round-robin so a change in the host's load
hits both alike, the time from launching QEMU to the first answered
inference for a boot and for a clone restored from the template. It reports
the median with the CPU time QEMU used until then, under the accelerator the
driver picks (``--accel`` forces one).

Memory: ``--clones`` restored clones running at once (each after one
inference) against the same number of booted replicas, as the sum of their
QEMU processes' PSS (``/proc/PID/smaps_rollup``): a page the clones share
through the template file's page cache is counted once across them, as the
issue asks ("count the template file's resident pages once").

From zero through the endpoint (``--endpoint-runtimes``, default
``process,container,unikernel``; empty to skip): a real daemon per runtime
(started with the test suite's helpers, tests/control/daemon_support.py, so
the bench and the end-to-end tests run the daemon the same way) with iris
autoscaled ``min: 0``; the client's time to its answer is taken once the
service is at zero, ``--runs`` times. For the unikernel the first request
from zero boots (no template yet; one sample) and every later one restores a
clone from the template taken after it; container and process start normally.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from uniframe.build.examples import write_iris
from uniframe.build.images import build_image, image_port
from uniframe.build.store import Image, ImageStore
from uniframe.build.unikernel import sample_request
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.qemu.driver import QemuMicroVMDriver
from uniframe.runtime.replica import Replica, ReplicaConfig
from uniframe.runtime.snapshot import Snapshot
from uniframe.runtime.verify import free_port, image_ref
from uniframe.spec import InferenceService, load_file

SPEC = """\
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {name: iris}
spec:
  model: {uri: ./iris.onnx}
  resources: {cpus: 1, memory: 256Mi}
"""
FIRST_INFERENCE_WITHIN = 180.0


def build_iris(work: Path) -> Image:
    write_iris(work)
    (work / "service.yaml").write_text(SPEC)
    (doc,) = load_file(work / "service.yaml")
    assert isinstance(doc.spec, InferenceService)
    return build_image(doc.spec, source_digest=doc.digest(), runtime="unikernel",
                       store=ImageStore(work / "images"))


def config_for(image: Image, accel: str | None, **changes: Any) -> ReplicaConfig:
    config = ReplicaConfig(image=image_ref(image), memory_mib=256,
                           ports=(PortMapping(free_port(), image_port(image)),),
                           snapshottable=True)
    if accel:
        config = replace(config, accel=accel)
    return replace(config, **changes)


def infer(port: int, body: bytes, timeout: float = 10.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v2/models/iris/infer", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def until_inference(port: int, body: bytes) -> None:
    deadline = time.monotonic() + FIRST_INFERENCE_WITHIN
    last = ""
    while time.monotonic() < deadline:
        try:
            status = infer(port, body, timeout=5)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.005)
    raise SystemExit(f"no inference on port {port} within {FIRST_INFERENCE_WITHIN} s ({last})")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pss_mib(pid: int) -> float:
    """The process's proportional set size: shared pages divided among their sharers."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"/proc/{pid}/smaps_rollup has no Pss line")


def timed(start: Callable[[ReplicaConfig], Replica], config: ReplicaConfig,
          body: bytes) -> tuple[Replica, float, float]:
    """Start one replica, wait for its first inference: (replica, wall s, QEMU CPU s)."""
    began = time.monotonic()
    replica = start(config)
    until_inference(config.ports[0].host_port, body)
    took = time.monotonic() - began
    return replica, took, cpu_seconds(replica.pid or 0)


AUTOSCALED = """
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {{name: iris}}
spec:
  model: iris@1
  runtime: {runtime}
  servicePort: {port}
  healthCheck: {{periodSeconds: 1}}
  autoscaling: {{min: 0, max: 1, target: 1, stableWindow: 6s, scaleToZeroGracePeriod: 1s,
                activationTimeout: 180s}}
"""


def from_zero(runtimes: list[str], runs: int, console: Console) -> dict[str, list[float]]:
    """Seconds from a request sent to a service at zero to its answer, per runtime."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "control"))
    from control_helpers import until  # type: ignore[import-not-found]
    from daemon_support import (  # type: ignore[import-not-found]
        ROW,
        event_reasons,
        replicas,
        running_daemon,
    )

    class Env:  # what running_daemon needs of pytest's monkeypatch
        def setenv(self, key: str, value: str) -> None:
            os.environ[key] = value

    out: dict[str, list[float]] = {}
    for runtime in runtimes:
        with tempfile.TemporaryDirectory(prefix=f"coldstart-{runtime}-") as tmp, \
                running_daemon(Path(tmp), Env(), str(Path(tmp) / "state.db")) as d:
            d.apply(AUTOSCALED.format(runtime=runtime, port=d.service_port))
            until("the image is built", lambda: "Built" in event_reasons(d), 1200)
            samples = []
            for _ in range(runs + (runtime == "unikernel")):
                until("the service is at zero", lambda: replicas(d) == [], 120)
                began = time.monotonic()
                status = infer(d.service_port, ROW, timeout=200)
                if status != 200:
                    raise SystemExit(f"{runtime}: the request from zero answered {status}")
                samples.append(time.monotonic() - began)
                console.print(f"{runtime}: from zero {samples[-1]:.3f} s")
            reasons = event_reasons(d)
        if runtime == "unikernel":
            if "RestoreFailed" in reasons or reasons.count("Restored") < runs:
                raise SystemExit(f"unikernel: expected {runs} restores, events: {reasons}")
            out["unikernel (boot, n=1)"] = samples[:1]
            out["unikernel (restore)"] = samples[1:]
        else:
            out[runtime] = samples
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="boots and restores each (median)")
    parser.add_argument("--clones", default="1,4", help="replica counts for the memory rows")
    parser.add_argument("--accel", default=None, help="force an accelerator (kvm, tcg)")
    parser.add_argument("--endpoint-runtimes", default="process,container,unikernel",
                        help="runtimes whose first request from zero is timed ('' skips)")
    parser.add_argument("--no-direct", action="store_true",
                        help="skip boot vs restore and memory (only the endpoint's figures)")
    args = parser.parse_args()
    if args.no_direct:
        return endpoint_figures(args, Console())
    counts = [int(c) for c in args.clones.split(",") if c]
    console = Console()
    with tempfile.TemporaryDirectory(prefix="coldstart-") as tmp:
        work = Path(tmp)
        console.print("building the iris unikernel...")
        image = build_iris(work)
        body = sample_request(image.manifest["model"]["inputs"])
        driver = QemuMicroVMDriver(work / "state" / "replicas")

        def boot(config: ReplicaConfig) -> Replica:
            return driver.start(driver.create(config).id)

        def done(replica: Replica) -> None:
            driver.stop(replica.id, timeout=15)
            driver.remove(replica.id, force=True)

        source, boot_s, _ = timed(boot, config_for(image, args.accel), body)
        accel = driver.accelerator(source) or "?"
        snap: Snapshot = driver.snapshot(source.id)
        stats = driver.snapshots.get(snap.id).stats
        done(source)
        template = config_for(image, args.accel)

        def restore(config: ReplicaConfig) -> Replica:
            return driver.restore(snap, config)

        runs: dict[str, list[tuple[float, float]]] = {"boot": [], "restore": []}
        for i in range(args.runs):
            for name, start, config in (
                    ("boot", boot, config_for(image, args.accel, snapshottable=False)),
                    ("restore", restore, replace(template, ports=config_for(image, None).ports))):
                replica, wall, cpu = timed(start, config, body)
                done(replica)
                runs[name].append((wall, cpu))
            console.print(f"run {i + 1}/{args.runs}: boot {runs['boot'][-1][0]:.2f} s, "
                          f"restore {runs['restore'][-1][0]:.3f} s")

        memory: dict[tuple[str, int], float] = {}
        for count in counts:
            for name, start, snapshottable in (("restored", restore, True),
                                               ("booted", boot, False)):
                started = []
                try:
                    for _ in range(count):
                        config = (replace(template, ports=config_for(image, None).ports)
                                  if name == "restored" else
                                  config_for(image, args.accel, snapshottable=snapshottable))
                        started.append(timed(start, config, body)[0])
                    memory[(name, count)] = sum(pss_mib(r.pid or 0) for r in started)
                finally:
                    for replica in started:
                        done(replica)
        driver.remove_snapshot(snap)

    def median(name: str, which: int) -> float:
        return statistics.median(r[which] for r in runs[name])

    table = Table(title=f"iris unikernel cold start, {accel}, median of {args.runs} "
                        f"(load avg {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs)")
    for col in ("", "QEMU start to first inference", "QEMU CPU until then"):
        table.add_column(col, justify="right" if col else "left")
    for name in ("boot", "restore"):
        table.add_row(name, f"{median(name, 0):.3f} s", f"{median(name, 1):.2f} s")
    table.add_row("boot / restore", f"{median('boot', 0) / median('restore', 0):.0f}x", "")
    console.print(table)
    console.print(f"template: first boot {boot_s:.1f} s, snapshot pause {stats.get('pause_ms')} ms, "
                  f"state {stats.get('state_bytes')} B, RAM copied "
                  f"{int(stats.get('ram_copied_bytes', 0)) / 1e6:.0f} MB")
    mem = Table(title="host memory (sum of QEMU PSS, after one inference each)")
    for col in ("replicas", "restored clones", "booted", "restored / one booted"):
        mem.add_column(col, justify="right")
    one_booted = memory.get(("booted", 1))
    for count in counts:
        restored, booted = memory[("restored", count)], memory[("booted", count)]
        mem.add_row(str(count), f"{restored:.0f} MiB", f"{booted:.0f} MiB",
                    f"{restored / one_booted:.2f}x" if one_booted else "-")
    console.print(mem)
    return endpoint_figures(args, console)


def endpoint_figures(args: argparse.Namespace, console: Console) -> int:
    runtimes = [r for r in args.endpoint_runtimes.split(",") if r]
    if runtimes:
        zero = from_zero(runtimes, args.runs, console)
        table = Table(title=f"first request from zero through the endpoint, median of {args.runs} "
                            f"(load avg {os.getloadavg()[0]:.1f})")
        for col in ("runtime", "median", "min", "max"):
            table.add_column(col, justify="right" if col != "runtime" else "left")
        for name, samples in zero.items():
            table.add_row(name, f"{statistics.median(samples):.3f} s", f"{min(samples):.3f} s",
                          f"{max(samples):.3f} s")
        console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
