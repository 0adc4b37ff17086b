"""Race ``uniframe serve`` against KServe 0.21 and MLServer 1.7.1 on one core, in one run.

Why one script and one run: this machine is shared and noisy, so figures from
different hours do not compare. Every server here answers the same OIP v2
request for the same iris classifier, pinned to the same core, loaded by the
same ``wrk`` on the other core, back to back; the target checks compare
uniframe with the best peer *of this run*.

Usage: ``python bench/serve_bench.py [--duration 15] [--warmup 3] [--only uniframe,kserve]``.
Peers live in their own venvs under ``~/.cache/uniframe/bench-venvs`` (created
on first use from the pinned lists in ``bench/peers``). Raw results go to
``bench/results/serve-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PEERS = BENCH / "peers"
RESULTS = BENCH / "results"

MODEL_NAME = "iris"
BODY = b'{"inputs":[{"name":"X","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}'
EXPECTED_LABEL = 0
SERVER_CORE = 0
LOAD_CORE = 1
CONNECTIONS = (1, 32)
ALL = ("uniframe", "kserve", "mlserver", "floor")
PEER_NAMES = ("kserve", "mlserver")
# Keep every server to one thread of numeric work: the race is about the serving path.
# Neighbours on this shared machine (kernel builds, QEMU tests) time-slice with the
# server and wrk; a higher priority for both (root only) keeps most of their noise out
# of the figures, the same for every server.
DEFAULT_NICE = -10 if os.geteuid() == 0 else 0
QUIET_MATH = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
"""


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and what was seen."""


# -- results ---------------------------------------------------------------------------------


@dataclass
class LoadResult:
    connections: int
    duration_s: float
    requests: int
    rps: float
    p50_us: float
    p99_us: float
    socket_errors: int
    non_2xx: int
    wrk_output: str
    server_cpu_s: float = 0.0  # CPU time the server's process tree (all threads) ran during the load
    server_wait_s: float = 0.0  # time its threads were runnable but another process had the core
    cpu_us_per_req: float | None = None


@dataclass
class ServerResult:
    name: str
    version: str = ""
    ok: bool = False
    error: str | None = None
    ready_s: float | None = None
    loads: dict[int, LoadResult] = field(default_factory=dict)
    rss_kib: int | None = None
    pss_kib: int | None = None
    processes: int | None = None
    log_lines: int | None = None
    notes: str = ""


@dataclass
class FloorResult:
    ok: bool = False
    error: str | None = None
    ort_run_us: float | None = None
    codec_run_us: float | None = None
    iterations: int = 0


@dataclass
class Check:
    name: str
    ours: float | None
    peer: str | None
    peer_value: float | None
    ratio: float | None
    target: str
    passed: bool | None


# -- wrk -------------------------------------------------------------------------------------

_TIME_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_NUM_UNIT = r"([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s|m|h)?"


def parse_time_us(value: str, unit: str | None) -> float:
    """wrk prints times as ``812.00us``, ``1.23ms``, ``2.01s`` or ``1.50m``; a bare number is µs."""
    return float(value) * _TIME_US[unit or "us"]


def parse_wrk(text: str, connections: int) -> LoadResult:
    """Read the figures out of ``wrk --latency`` text output, whatever unit it chose."""
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    total = re.search(r"^\s*([0-9]+) requests in " + _NUM_UNIT, text, re.M)
    pct: dict[str, float] = {}
    dist = text.partition("Latency Distribution")[2]
    for m in re.finditer(r"^\s*([0-9]+(?:\.[0-9]+)?)%\s+" + _NUM_UNIT + r"\s*$", dist, re.M):
        pct[str(float(m.group(1)))] = parse_time_us(m.group(2), m.group(3))
    if rps is None or total is None or "50.0" not in pct or "99.0" not in pct:
        raise BenchError(f"cannot read wrk's output (want Requests/sec and --latency percentiles):\n{text}")
    sock = re.search(
        r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)", text
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: ([0-9]+)", text)
    return LoadResult(
        connections=connections,
        duration_s=parse_time_us(total.group(2), total.group(3)) / 1e6,
        requests=int(total.group(1)),
        rps=float(rps.group(1)),
        p50_us=pct["50.0"],
        p99_us=pct["99.0"],
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        wrk_output=text,
    )


def niced(nice: int, core: int, argv: list[str]) -> list[str]:
    """``argv`` pinned to ``core``, at niceness ``nice`` when it is not 0."""
    head = ["nice", "-n", str(nice)] if nice else []
    return [*head, "taskset", "-c", str(core), *argv]


def run_wrk(url: str, script: Path, connections: int, seconds: int, nice: int) -> LoadResult:
    cmd = niced(nice, LOAD_CORE, [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
        "--timeout", "5s", "--latency", "-s", str(script), url,
    ])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if proc.returncode != 0:
        raise BenchError(f"wrk exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    result = parse_wrk(proc.stdout, connections)
    if result.duration_s < 0.9 * seconds:  # wrk stops early and reports on SIGINT
        raise BenchError(f"wrk stopped after {result.duration_s:.1f} s of {seconds} s (interrupted?)")
    return result


# -- processes -------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name in field 2 may hold spaces and parens.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    return tree


def _kib(path: Path, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def tree_sched_s(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) so far, over every thread of
    ``pid`` and its descendants, from ``/proc/<pid>/task/<tid>/schedstat``.

    The wait is what neighbours on a shared machine cost the server; the run time per
    request is the server's own cost, which their time-slicing does not change.
    """
    ran = waited = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    fields = (task / "schedstat").read_text().split()
                    ran += int(fields[0])
                    waited += int(fields[1])
    return ran / 1e9, waited / 1e9


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(RSS KiB, PSS KiB, process count) over ``pid`` and all its descendants."""
    pids = process_tree(pid)
    rss = sum(_kib(Path(f"/proc/{p}/status"), "VmRSS:") for p in pids)
    pss = sum(_kib(Path(f"/proc/{p}/smaps_rollup"), "Pss:") for p in pids)
    return rss, pss, len(pids)


class Server:
    """A server process in its own session, pinned to the server core, stopped as a group."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path | None, nice: int) -> None:
        self.name = name
        self.log = log
        env = {**os.environ, **QUIET_MATH, "PYTHONUNBUFFERED": "1"}
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            niced(nice, SERVER_CORE, argv),
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            cwd=cwd, env=env, start_new_session=True,
        )

    def log_tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            text = self.log.read_text(errors="replace").splitlines()
            return "\n".join(text[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left after 10 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers (workers) share the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log_file.close()


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(server: Server, port: int, timeout: float = 120.0) -> float:
    start = time.monotonic()
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    while time.monotonic() - start < timeout:
        if server.proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with {server.proc.returncode} before it was ready:\n"
                + server.log_tail()
            )
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return time.monotonic() - start
        time.sleep(0.2)
    raise BenchError(f"{server.name} not ready after {timeout:.0f} s:\n" + server.log_tail())


def verify_answer(name: str, port: int) -> None:
    """One real request: the class label (the INT64 output, whatever its name) must be 0."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{MODEL_NAME}/infer", data=BODY,
        headers={"Content-Type": "application/json"}, method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise BenchError(f"{name}: infer returned {exc.code}: {exc.read()[:500]!r}") from None
    labels = [o for o in answer.get("outputs", []) if o.get("datatype") == "INT64"]
    data = labels[0].get("data") if labels else None
    while isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
        data = data[0]
    if data != [EXPECTED_LABEL]:
        raise BenchError(f"{name}: wrong answer, want label {EXPECTED_LABEL}: {answer}")


# -- peer venvs ------------------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("UNIFRAME_CACHE") or Path.home() / ".cache" / "uniframe")


def ensure_venv(name: str, say: Callable[[str], None]) -> Path:
    """A venv per peer, rebuilt when its pinned list or the Python that runs the bench changes."""
    requirements = PEERS / f"{name}-requirements.txt"
    root = cache_root() / "bench-venvs" / name
    stamp = root / ".uniframe-stamp"
    digest = hashlib.sha256(
        requirements.read_bytes() + sys.version.encode() + sys.executable.encode()
    ).hexdigest()
    python = root / "bin" / "python"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return root
    say(f"creating the {name} venv in {root} (pip install -r {requirements.relative_to(BENCH.parent)})")
    if root.exists():
        shutil.rmtree(root)
    steps = [
        [sys.executable, "-m", "venv", str(root)],
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
         "-r", str(requirements)],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            out = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
            raise BenchError(f"creating the {name} venv failed: {' '.join(cmd)}\n{out}")
    stamp.write_text(digest + "\n")
    return root


def package_version(python: Path | str, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "?"


# -- the servers -----------------------------------------------------------------------------


@dataclass
class Prepared:
    argv: list[str]
    port: int
    version: str
    cwd: Path | None = None
    notes: str = ""


def prepare_uniframe(work: Path, onnx: Path, say: Callable[[str], None]) -> Prepared:
    port = free_port()
    argv = [sys.executable, "-m", "uniframe.serve", str(onnx), "--name", MODEL_NAME,
            "--port", str(port), "--host", "127.0.0.1"]
    return Prepared(argv, port, package_version(sys.executable, "uniframe"),
                    notes="1 process, ORT 1 intra-op thread")


def prepare_kserve(work: Path, onnx: Path, say: Callable[[str], None]) -> Prepared:
    venv = ensure_venv("kserve", say)
    port = free_port()
    argv = [str(venv / "bin" / "python"), str(PEERS / "kserve_server.py"), str(onnx), MODEL_NAME,
            str(port)]
    return Prepared(argv, port, package_version(venv / "bin" / "python", "kserve"),
                    notes="1 uvicorn worker, no gRPC, no request logs, ORT 1 intra-op thread")


def prepare_mlserver(work: Path, onnx: Path, say: Callable[[str], None]) -> Prepared:
    venv = ensure_venv("mlserver", say)
    python = venv / "bin" / "python"
    repo = work / "mlserver-repo"
    port, grpc_port = free_port(), free_port()
    proc = subprocess.run(
        [str(python), str(PEERS / "mlserver_model.py"), str(repo), MODEL_NAME, str(port),
         str(grpc_port)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"training the MLServer iris model failed:\n{proc.stderr.strip()}")
    return Prepared([str(venv / "bin" / "mlserver"), "start", str(repo)], port,
                    package_version(python, "mlserver"), cwd=repo,
                    notes="sklearn via mlserver-sklearn, parallel_workers 0, no metrics/access log; "
                          "gRPC cannot be turned off (idle)")


PREPARE: dict[str, Callable[[Path, Path, Callable[[str], None]], Prepared]] = {
    "uniframe": prepare_uniframe,
    "kserve": prepare_kserve,
    "mlserver": prepare_mlserver,
}


def bench_server(name: str, work: Path, onnx: Path, script: Path, args: argparse.Namespace,
                 logs: Path, say: Callable[[str], None]) -> ServerResult:
    result = ServerResult(name)
    try:
        prep = PREPARE[name](work, onnx, say)
        result.version, result.notes = prep.version, prep.notes
        say(f"{name} {prep.version}: starting on core {SERVER_CORE}, port {prep.port}")
        with running(Server(name, prep.argv, work / f"{name}.log", prep.cwd, args.nice)) as server:
            result.ready_s = wait_ready(server, prep.port)
            verify_answer(name, prep.port)
            url = f"http://127.0.0.1:{prep.port}/v2/models/{MODEL_NAME}/infer"
            if args.warmup > 0:
                say(f"{name}: warm-up {args.warmup} s")
                run_wrk(url, script, max(CONNECTIONS), args.warmup, args.nice)
            for conns in CONNECTIONS:
                say(f"{name}: {args.duration} s at {conns} connection(s)")
                ran0, waited0 = tree_sched_s(server.proc.pid)
                load = run_wrk(url, script, conns, args.duration, args.nice)
                ran1, waited1 = tree_sched_s(server.proc.pid)
                load.server_cpu_s, load.server_wait_s = ran1 - ran0, waited1 - waited0
                if load.requests:
                    load.cpu_us_per_req = load.server_cpu_s / load.requests * 1e6
                result.loads[conns] = load
                if server.proc.poll() is not None:
                    raise BenchError(f"{name} died under load:\n{server.log_tail()}")
            result.rss_kib, result.pss_kib, result.processes = tree_memory(server.proc.pid)
            verify_answer(name, prep.port)
        result.ok = True
    except BenchError as exc:
        result.error = str(exc)
        say(f"{name}: FAILED: {exc}")
    log = work / f"{name}.log"
    if log.exists():  # a server that logged per request would show thousands of lines here
        result.log_lines = len(log.read_bytes().splitlines())
        logs.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, logs / log.name)
    return result


# -- the in-process floor --------------------------------------------------------------------


def _per_call_us(fn: Callable[[], object], seconds: float, chunk: int = 1000) -> tuple[float, int]:
    """Median over chunks of the mean time per call: robust to a neighbour stealing the core."""
    for _ in range(chunk):
        fn()
    means: list[float] = []
    done = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(means) < 3:
        t0 = time.perf_counter()
        for _ in range(chunk):
            fn()
        means.append((time.perf_counter() - t0) / chunk * 1e6)
        done += chunk
    return statistics.median(means), done


def measure_floor(onnx: Path, seconds: float, nice: int) -> FloorResult:
    """ONNX Runtime alone, then request bytes -> orjson/numpy -> run -> response bytes; no HTTP."""
    import numpy as np

    from uniframe.serve.codec import decode, encode
    from uniframe.serve.model import OnnxModel

    result = FloorResult()
    model = OnnxModel(onnx, MODEL_NAME)
    affinity = os.sched_getaffinity(0)
    priority = os.getpriority(os.PRIO_PROCESS, 0)
    os.sched_setaffinity(0, {SERVER_CORE})
    if nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    try:
        request = decode(model, BODY, None)
        feeds, outputs = request.feeds, request.outputs

        def ort_only() -> object:
            return model.run(feeds, outputs)

        def with_codec() -> object:
            req = decode(model, BODY, None)
            return encode(model, req, model.run(req.feeds, req.outputs))[0]

        answer = json.loads(encode(model, request, model.run(feeds, outputs))[0])
        label = next(o["data"] for o in answer["outputs"] if o["datatype"] == "INT64")
        if list(np.asarray(label).reshape(-1)) != [EXPECTED_LABEL]:
            raise BenchError(f"floor: wrong answer {answer}")
        result.ort_run_us, n1 = _per_call_us(ort_only, seconds)
        result.codec_run_us, n2 = _per_call_us(with_codec, seconds)
        result.iterations = n1 + n2
        result.ok = True
    except BenchError as exc:
        result.error = str(exc)
    finally:
        if nice:
            os.setpriority(os.PRIO_PROCESS, 0, priority)
        os.sched_setaffinity(0, affinity)
    return result


# -- checks and output -----------------------------------------------------------------------


def target_checks(servers: dict[str, ServerResult]) -> list[Check]:
    ours = servers.get("uniframe")
    peers = [s for n, s in servers.items() if n in PEER_NAMES and s.ok]
    hi, lo = max(CONNECTIONS), min(CONNECTIONS)

    def check(name: str, target: str, value: Callable[[ServerResult], float | None],
              pick: Callable[[list[float]], float], ok: Callable[[float], bool]) -> Check:
        mine = value(ours) if ours is not None and ours.ok else None
        scored = [(value(p), p.name) for p in peers]
        known = [(v, n) for v, n in scored if v is not None]
        if not known:
            return Check(name, mine, None, None, None, target, None)
        best = pick([v for v, _ in known])
        peer = next(n for v, n in known if v == best)
        if mine is None or best == 0:
            return Check(name, mine, peer, best, None, target, None)
        ratio = mine / best
        return Check(name, mine, peer, best, ratio, target, ok(ratio))

    def rps(s: ServerResult) -> float | None:
        return s.loads[hi].rps if hi in s.loads else None

    def p50(s: ServerResult) -> float | None:
        return s.loads[lo].p50_us if lo in s.loads else None

    def rss(s: ServerResult) -> float | None:
        return float(s.rss_kib) if s.rss_kib else None

    return [
        check(f"throughput @{hi} conns", ">= 4x best peer", rps, max, lambda r: r >= 4.0),
        check(f"p50 latency @{lo} conn", "<= 0.25x best peer", p50, min, lambda r: r <= 0.25),
        check("RSS after load", "<= 0.5x smallest peer", rss, min, lambda r: r <= 0.5),
    ]


def cpu_cost_line(servers: dict[str, ServerResult]) -> str | None:
    """Server CPU per request at full load, against the cheapest peer: the figure that the
    neighbours' share of the core does not move, to read beside the wall-clock checks."""
    hi = max(CONNECTIONS)

    def cost(s: ServerResult | None) -> float | None:
        load = s.loads.get(hi) if s is not None and s.ok else None
        return load.cpu_us_per_req if load else None

    ours = cost(servers.get("uniframe"))
    peers = [(c, n) for n, s in servers.items() if n in PEER_NAMES and (c := cost(s))]
    if ours is None or not peers:
        return None
    best, name = min(peers)
    return (f"server CPU per request @{hi}: uniframe {ours:.0f} µs, {name} {best:.0f} µs "
            f"({best / ours:.1f}x as much)")


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1e6:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1e6:.2f} s"


def fmt_rps(rps: float | None) -> str:
    return "-" if rps is None else f"{rps:,.0f}"


def server_rows(servers: dict[str, ServerResult]) -> list[list[str]]:
    rows = []
    for s in servers.values():
        if not s.ok:
            rows.append([f"{s.name} {s.version}".strip(), "FAILED", *["-"] * (len(SERVER_HEAD) - 2)])
            continue
        cells = [f"{s.name} {s.version}"]
        for conns in CONNECTIONS:
            load = s.loads.get(conns)
            cells += [fmt_rps(load.rps if load else None), fmt_us(load.p50_us if load else None),
                      fmt_us(load.p99_us if load else None)]
        busy = s.loads.get(max(CONNECTIONS))
        cells.append(fmt_us(busy.cpu_us_per_req if busy else None))
        cells.append("/".join(
            f"{100 * ld.server_wait_s / ld.duration_s:.0f}%" if (ld := s.loads.get(c)) else "-"
            for c in CONNECTIONS))
        errors = sum(ld.socket_errors + ld.non_2xx for ld in s.loads.values())
        cells += [f"{(s.rss_kib or 0) / 1024:.1f}", str(errors)]
        rows.append(cells)
    return rows


def check_rows(checks: list[Check]) -> list[list[str]]:
    rows = []
    for c in checks:
        is_rss = c.name.startswith("RSS")
        is_lat = c.name.startswith("p50")

        def show(v: float | None, rss: bool = is_rss, lat: bool = is_lat) -> str:
            if v is None:
                return "-"
            if rss:
                return f"{v / 1024:.1f} MiB"
            return fmt_us(v) if lat else f"{v:,.0f} req/s"

        verdict = "n/a" if c.passed is None else ("PASS" if c.passed else "FAIL")
        rows.append([c.name, show(c.ours), f"{c.peer or '-'}: {show(c.peer_value)}",
                     "-" if c.ratio is None else f"{c.ratio:.2f}x", c.target, verdict])
    return rows


SERVER_HEAD = ["server", "req/s @1", "p50 @1", "p99 @1", "req/s @32", "p50 @32", "p99 @32",
               "CPU/req @32", "waited @1/@32", "RSS MiB", "errors"]
CHECK_HEAD = ["target", "uniframe", "best peer", "ratio", "wanted", "result"]


def render(title: str, head: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        print(f"\n{title}")
        for r in [head, ["-" * w for w in widths], *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        return
    table = Table(title=title, title_justify="left")
    # Piped output gets rich's 80 columns, which wraps every cell: give it room instead.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        style = {"PASS": "green", "FAIL": "red"}.get(r[-1], "")
        table.add_row(*r, style=style)
    console.print(table)


def _cpu_times() -> dict[str, tuple[int, int]]:
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(f) for f in fields]
            times[name] = (sum(ticks), ticks[3] + ticks[4])  # total, idle + iowait
    return times


def cpu_busy(seconds: float = 2.0) -> dict[str, float]:
    """Per-core busy percent over ``seconds`` before the run: what the neighbours are doing."""
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    busy = {}
    for cpu, (total, idle) in after.items():
        t0, i0 = before.get(cpu, (total, idle))
        dt = total - t0
        busy[cpu] = round(100.0 * (1 - (idle - i0) / dt), 1) if dt else 0.0
    return busy


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": (wrk.stdout or wrk.stderr).strip().splitlines()[0] if (wrk.stdout or wrk.stderr) else "",
        "server_core": SERVER_CORE,
        "load_core": LOAD_CORE,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--duration", type=int, default=15, help="seconds per load level (default 15)")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of warm-up load (default 3)")
    ap.add_argument("--nice", type=int, default=DEFAULT_NICE,
                    help="niceness of servers, wrk and the floor loop (default -10 as root, else 0; "
                         "0 turns it off)")
    ap.add_argument("--only", default=",".join(ALL),
                    help=f"comma-separated subset of {','.join(ALL)} (default: all)")
    args = ap.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.only if n not in ALL]
    if unknown:
        ap.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(ALL)}")
    if args.duration < 1 or args.warmup < 0:
        ap.error("--duration must be >= 1 and --warmup >= 0 (whole seconds, as wrk takes them)")
    return args


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        print("serve_bench: needs 2 cores (server on core 0, wrk on core 1)", file=sys.stderr)
        return 2
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            where = "scripts/install.sh installs it" if tool == "wrk" else "part of util-linux"
            print(f"serve_bench: {tool} is not installed ({where})", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so `finally` stops the servers

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / f"serve-{stamp}-logs"
    record: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "loadavg_start": os.getloadavg(),
        "cpu_busy_before_pct": cpu_busy(),
        "config": {"duration_s": args.duration, "warmup_s": args.warmup, "only": args.only,
                   "nice": args.nice,
                   "connections": list(CONNECTIONS), "body": BODY.decode()},
    }
    servers: dict[str, ServerResult] = {}
    floor: FloorResult | None = None
    interrupted = False
    from uniframe.build.examples import write_iris

    with tempfile.TemporaryDirectory(prefix="uniframe-bench-") as tmp:
        work = Path(tmp)
        onnx = write_iris(work)
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT % BODY.decode())
        try:
            for name in args.only:
                if name in PREPARE:
                    servers[name] = bench_server(name, work, onnx, script, args, logs, say)
            if "floor" in args.only:
                seconds = min(float(args.duration), 5.0)
                say(f"floor: in-process ONNX Runtime and OIP codec, {seconds:.0f} s each, core {SERVER_CORE}")
                floor = measure_floor(onnx, seconds, args.nice)
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: servers stopped, writing what was measured")

    checks = target_checks(servers)
    record.update({
        "interrupted": interrupted,
        "loadavg_end": os.getloadavg(),
        "server_logs": str(logs),
        "servers": {n: asdict(s) for n, s in servers.items()},
        "floor": asdict(floor) if floor else None,
        "checks": [asdict(c) for c in checks],
    })
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"serve-{stamp}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")

    cpu = record["machine"]["cpu_model"] or "?"
    render(f"OIP v2 iris infer, server on core {SERVER_CORE}, wrk -t1 on core {LOAD_CORE}, "
           f"{args.duration} s per level ({cpu})", SERVER_HEAD, server_rows(servers))
    if floor is not None:
        if floor.ok and floor.ort_run_us and floor.codec_run_us:
            render("in-process floor (no HTTP, one core)", ["what", "per request", "ceiling req/s"], [
                ["onnxruntime run", f"{floor.ort_run_us:.1f} µs", f"{1e6 / floor.ort_run_us:,.0f}"],
                ["OIP JSON decode + run + encode", f"{floor.codec_run_us:.1f} µs",
                 f"{1e6 / floor.codec_run_us:,.0f}"],
            ])
        else:
            print(f"floor: FAILED: {floor.error}")
    if "uniframe" in servers:
        render("targets against the best peer of this run", CHECK_HEAD, check_rows(checks))
        cost = cpu_cost_line(servers)
        if cost:
            print(cost)
    busy = ", ".join(f"{c} {v:.0f}%" for c, v in record["cpu_busy_before_pct"].items())
    print(f"other load before the run: {busy} busy; 1-min load average "
          f"{record['loadavg_start'][0]:.2f} at start, {record['loadavg_end'][0]:.2f} at end")
    print(f"raw results: {out}; server logs: {logs}")
    if interrupted:
        return 130
    return 0 if all(s.ok for s in servers.values()) and (floor is None or floor.ok) else 1


if __name__ == "__main__":
    sys.exit(main())
