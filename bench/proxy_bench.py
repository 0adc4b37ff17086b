"""What the service endpoint costs: one replica direct vs through ``uniframe.control.proxy``.

Why interleaved A/B and paired ratios: this machine is shared and noisy, and a
figure from one minute does not compare with one from the next. Each
repetition measures the replica directly and through the endpoint (in every
placement asked for) back to back, in an order that rotates between
repetitions; each repetition yields one overhead and one throughput ratio per
placement, and the table reports their medians.

With two cores the three busy processes (model server, endpoint, wrk) cannot
each have a core. The server always has core 0 and wrk core 1; the endpoint
is placed beside wrk (``with-wrk``), beside the server (``with-server``), or
left to the scheduler (``floating``).

Usage: ``python bench/proxy_bench.py [--duration 5] [--reps 5] [--placements with-wrk,...]``.
Raw results go to ``bench/results/proxy-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SERVER_CORE, LOAD_CORE = 0, 1
CONNECTIONS = (1, 32)
PLACEMENTS = {"with-wrk": {LOAD_CORE}, "with-server": {SERVER_CORE}, "floating": {SERVER_CORE, LOAD_CORE}}
MAX_P50_OVERHEAD_US = 300.0
MIN_THROUGHPUT_RATIO = 0.80
BODY = b'{"inputs":[{"name":"X","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}'
WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
"""
# Root may outrank the neighbours of this shared machine; the same for every process measured.
DEFAULT_NICE = -10 if os.geteuid() == 0 else 0
QUIET_MATH = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and what was seen."""


@dataclass
class LoadResult:
    connections: int
    requests: int
    duration_s: float
    rps: float
    p50_us: float
    p99_us: float
    socket_errors: int
    non_2xx: int
    wrk_output: str


_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}
_TIME = r"([0-9]+(?:\.[0-9]+)?)(us|ms|s|m)"


def parse_wrk(text: str, connections: int) -> LoadResult:
    """The figures of ``wrk --latency`` text output, times converted to µs."""
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    total = re.search(r"^\s*([0-9]+) requests in " + _TIME, text, re.M)
    pct = {float(m.group(1)): float(m.group(2)) * _UNIT_US[m.group(3)]
           for m in re.finditer(r"^\s*([0-9.]+)%\s+" + _TIME + r"\s*$", text.partition("Distribution")[2], re.M)}
    if rps is None or total is None or 50.0 not in pct or 99.0 not in pct:
        raise BenchError(f"cannot read wrk's output:\n{text}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return LoadResult(connections, int(total.group(1)), float(total.group(2)) * _UNIT_US[total.group(3)] / 1e6,
                      float(rps.group(1)), pct[50.0], pct[99.0],
                      sum(int(g) for g in sock.groups()) if sock else 0,
                      int(non2xx.group(1)) if non2xx else 0, text)


def niced(nice: int, core: int, argv: list[str]) -> list[str]:
    return [*(["nice", "-n", str(nice)] if nice else []), "taskset", "-c", str(core), *argv]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_busy(seconds: float = 2.0) -> dict[str, float]:
    """Per-core busy percent just before the run: what the neighbours are doing."""
    def sample() -> dict[str, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *f = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(x) for x in f]
                out[name] = (sum(ticks), ticks[3] + ticks[4])
        return out
    before = sample()
    time.sleep(seconds)
    return {cpu: round(100.0 * (1 - (idle - before[cpu][1]) / max(total - before[cpu][0], 1)), 1)
            for cpu, (total, idle) in sample().items()}


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "")
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "wrk": (wrk_v.stdout or wrk_v.stderr).strip().split("\n")[0]}


def render(title: str, head: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r, style={"PASS": "green", "FAIL": "red"}.get(r[-1], ""))
    (Console() if sys.stdout.isatty() else Console(width=160)).print(table)


@dataclass
class Run:
    """One wrk run against one target in one repetition."""

    target: str  # "direct" or a placement
    rep: int
    load: LoadResult
    server_cpu_us_per_req: float
    proxy_cpu_us_per_req: float | None


@dataclass
class Summary:
    target: str
    p50_us: float
    p99_us: float
    rps32: float
    p50_overhead_us: float | None = None  # median over repetitions of (this - direct) p50 at 1 connection
    rps_ratio: float | None = None  # median over repetitions of this / direct req/s at 32 connections
    proxy_cpu_us_per_req: float | None = None
    errors: int = 0
    overheads: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


class Proc:
    """A process in its own session, stopped as a group."""

    def __init__(self, argv: list[str], log: Path, stdout_pipe: bool = False) -> None:
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if stdout_pipe else self.log,
            stderr=self.log, env={**os.environ, **QUIET_MATH, "PYTHONUNBUFFERED": "1"},
            start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


@contextlib.contextmanager
def started(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


def wait_ready(proc: Proc, port: int, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.proc.returncode} before it was ready (see {proc.log.name})")
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise BenchError(f"{what} not ready after {timeout:.0f} s (see {proc.log.name})")


def verify(port: int, what: str) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/iris/infer", data=BODY,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = json.loads(resp.read())
    if answer["outputs"][0]["data"] != [0]:
        raise BenchError(f"{what}: wrong answer {answer}")


def wrk(port: int, script: Path, connections: int, seconds: int, nice: int) -> LoadResult:
    cmd = niced(nice, LOAD_CORE, ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
                                  "--latency", "-s", str(script), f"http://127.0.0.1:{port}/v2/models/iris/infer"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if proc.returncode != 0:
        raise BenchError(f"wrk exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return parse_wrk(proc.stdout, connections)


def summarize(runs: list[Run], targets: list[str]) -> list[Summary]:
    def pick(target: str, conns: int) -> dict[int, Run]:
        return {r.rep: r for r in runs if r.target == target and r.load.connections == conns}

    direct1, direct32 = pick("direct", 1), pick("direct", 32)
    out = []
    for t in targets:
        one, many = pick(t, 1), pick(t, 32)
        s = Summary(
            target=t,
            p50_us=statistics.median(r.load.p50_us for r in one.values()),
            p99_us=statistics.median(r.load.p99_us for r in one.values()),
            rps32=statistics.median(r.load.rps for r in many.values()),
            errors=sum(r.load.socket_errors + r.load.non_2xx for r in [*one.values(), *many.values()]),
        )
        cpu = [r.proxy_cpu_us_per_req for r in many.values() if r.proxy_cpu_us_per_req is not None]
        s.proxy_cpu_us_per_req = statistics.median(cpu) if cpu else None
        if t != "direct":
            s.overheads = [one[k].load.p50_us - direct1[k].load.p50_us for k in one if k in direct1]
            s.ratios = [many[k].load.rps / direct32[k].load.rps for k in many if k in direct32]
            s.p50_overhead_us = statistics.median(s.overheads)
            s.rps_ratio = statistics.median(s.ratios)
        out.append(s)
    return out


def rows(summaries: list[Summary]) -> list[list[str]]:
    table = []
    for s in summaries:
        verdict = ""
        if s.p50_overhead_us is not None and s.rps_ratio is not None:
            ok = s.p50_overhead_us <= MAX_P50_OVERHEAD_US and s.rps_ratio >= MIN_THROUGHPUT_RATIO
            verdict = "PASS" if ok and not s.errors else "FAIL"
        table.append([
            s.target if s.target == "direct" else f"proxy {s.target}",
            f"{s.p50_us:.0f} µs", f"{s.p99_us:.0f} µs",
            "" if s.p50_overhead_us is None else f"{s.p50_overhead_us / 1000:+.3f} ms",
            f"{s.rps32:,.0f}",
            "" if s.rps_ratio is None else f"{s.rps_ratio:.0%}",
            "" if s.proxy_cpu_us_per_req is None else f"{s.proxy_cpu_us_per_req:.1f} µs",
            str(s.errors), verdict,
        ])
    return table


HEAD = ["path", "p50 @1", "p99 @1", "Δp50 @1 (≤0.3 ms)", "req/s @32", "ratio (≥80%)", "proxy CPU/req",
        "errors", "result"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per target (default 2)")
    ap.add_argument("--placements", default=",".join(PLACEMENTS),
                    help=f"endpoint placements to measure, of {','.join(PLACEMENTS)} (default: all)")
    ap.add_argument("--nice", type=int, default=DEFAULT_NICE,
                    help="niceness of server, endpoint and wrk (default -10 as root; 0 turns it off)")
    args = ap.parse_args(argv)
    args.placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    unknown = [p for p in args.placements if p not in PLACEMENTS]
    if unknown or not args.placements:
        ap.error(f"--placements: choose from {', '.join(PLACEMENTS)}")
    if args.duration < 1 or args.reps < 1 or args.warmup < 0:
        ap.error("--duration and --reps must be >= 1, --warmup >= 0")
    return args


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        print("proxy_bench: needs 2 cores", file=sys.stderr)
        return 2
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"proxy_bench: {tool} is not installed (scripts/install.sh installs it)", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so `finally` stops the processes

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
        "loadavg_start": os.getloadavg(), "cpu_busy_before_pct": cpu_busy(),
        "config": {"duration_s": args.duration, "reps": args.reps, "warmup_s": args.warmup,
                   "placements": args.placements, "nice": args.nice, "body": BODY.decode(),
                   "server_core": SERVER_CORE, "wrk_core": LOAD_CORE},
    }
    targets = ["direct", *args.placements]
    runs: list[Run] = []
    interrupted = False
    from uniframe.build.examples import write_iris

    with tempfile.TemporaryDirectory(prefix="uniframe-proxy-bench-") as tmp:
        work = Path(tmp)
        onnx = write_iris(work)
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT % BODY.decode())
        sport, pport = free_port(), free_port()
        server = Proc(niced(args.nice, SERVER_CORE, [
            sys.executable, "-m", "uniframe.serve", f"iris={onnx}", "--host", "127.0.0.1", "--port", str(sport)]),
            RESULTS / f"proxy-{stamp}-server.log")
        proxy = Proc(["nice", "-n", str(args.nice), sys.executable, "-m", "uniframe.control.proxy",
                      "--service", "iris", "--port", str(pport), "--backend", f"r1=127.0.0.1:{sport}"],
                     RESULTS / f"proxy-{stamp}-proxy.log", stdout_pipe=True)
        try:
            with started(server), started(proxy):
                wait_ready(server, sport, "model server")
                wait_ready(proxy, pport, "endpoint")
                verify(sport, "model server")
                verify(pport, "endpoint")
                say(f"server pid {server.proc.pid} on core {SERVER_CORE}, endpoint pid {proxy.proc.pid}, "
                    f"wrk on core {LOAD_CORE}; {args.reps} reps x {len(targets)} targets x "
                    f"{len(CONNECTIONS)} levels x {args.duration} s")
                for t in targets:
                    if t != "direct":
                        os.sched_setaffinity(proxy.proc.pid, PLACEMENTS[t])
                    wrk(sport if t == "direct" else pport, script, 32, args.warmup, args.nice)
                for rep in range(args.reps):
                    order = targets[rep % len(targets):] + targets[:rep % len(targets)]
                    for t in order:
                        if t != "direct":
                            os.sched_setaffinity(proxy.proc.pid, PLACEMENTS[t])
                        port = sport if t == "direct" else pport
                        for conns in CONNECTIONS:
                            s0, p0 = cpu_s(server.proc.pid), cpu_s(proxy.proc.pid)
                            load = wrk(port, script, conns, args.duration, args.nice)
                            s1, p1 = cpu_s(server.proc.pid), cpu_s(proxy.proc.pid)
                            n = max(load.requests, 1)
                            runs.append(Run(t, rep, load, (s1 - s0) * 1e6 / n,
                                            None if t == "direct" else (p1 - p0) * 1e6 / n))
                            say(f"rep {rep + 1}/{args.reps} {t:>11} c{conns:<2}: {load.rps:9,.0f} req/s  "
                                f"p50 {load.p50_us:6.0f} µs  p99 {load.p99_us:7.0f} µs")
                verify(pport, "endpoint")
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: processes stopped, writing what was measured")

    summaries = summarize(runs, targets) if runs and not interrupted else []
    record.update({
        "interrupted": interrupted, "loadavg_end": os.getloadavg(),
        "runs": [asdict(r) for r in runs], "summaries": [asdict(s) for s in summaries],
        "targets": {"max_p50_overhead_us": MAX_P50_OVERHEAD_US, "min_throughput_ratio": MIN_THROUGHPUT_RATIO},
    })
    out = RESULTS / f"proxy-{stamp}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    if not summaries:
        return 130 if interrupted else 1
    cpu = re.sub(r"\s+", " ", record["machine"]["cpu_model"] or "?")
    render(f"iris infer: direct vs through the endpoint; server core {SERVER_CORE}, wrk -t1 core {LOAD_CORE}; "
           f"medians of {args.reps} interleaved reps of {args.duration} s ({cpu})", HEAD, rows(summaries))
    print(f"raw results: {out}")
    return 0 if all(s.errors == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
