"""The service endpoint end to end: real model-server replicas, a real endpoint process, real HTTP.

Replicas are ``python -m uniframe.serve`` processes serving the iris model.
Where a test needs a replica to misbehave on purpose (answer slowly, hang up
without answering, echo what it received) it uses ``TEST_BACKEND`` below, a
small standard-library HTTP server run as its own process.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from uniframe.build.examples import write_iris
from uniframe.control.proxy import Backend, Endpoint, EndpointError

BODY = json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                               "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
INFER = "/v2/models/iris/infer"

TEST_BACKEND = r'''
"""A replica that misbehaves on request: slow (argv[2] seconds per inference), "drop" (hangs up
without answering inferences), and always: /echo answers with the exact bytes of the request,
/chunked answers with a chunked body."""
import json, socket, sys, threading, time

name, mode = sys.argv[1], sys.argv[2]
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)

def read_request(f):
    head = b""
    while True:
        line = f.readline()
        if not line:
            return None
        head += line
        if line == b"\r\n":
            break
    low = head.lower()
    body = b""
    if b"transfer-encoding: chunked" in low:
        while True:
            size_line = f.readline()
            body += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while True:
                    t = f.readline()
                    body += t
                    if t == b"\r\n":
                        return head, body
            body += f.read(size + 2)
    if b"content-length:" in low:
        n = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
        body = f.read(n)
    return head, body

def serve(conn):
    f = conn.makefile("rb")
    while (req := read_request(f)) is not None:
        head, body = req
        path = head.split(b" ")[1]
        if path.startswith(b"/v2/health"):
            out = b'{"ready":true}'
        elif path == b"/echo":
            out = head + body
        elif mode == "drop":
            conn.close()
            return
        else:
            time.sleep(float(mode))
            out = json.dumps({"who": name}).encode()
        if path == b"/chunked":
            parts = (out[:3], out[3:])
            resp = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n")
        else:
            resp = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(out)) + out
        conn.sendall(resp)
    conn.close()

while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen[str]
    port: int

    def backend(self, group: str = "default") -> Backend:
        return Backend(self.name, "127.0.0.1", self.port, group)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _start_replicas(model: Path, names: list[str]) -> list[Replica]:
    """Start model servers in parallel (each takes a second to import onnxruntime)."""
    procs = [subprocess.Popen(
        [sys.executable, "-m", "uniframe.serve", f"iris={model}", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}) for _ in names]
    replicas = []
    for name, proc in zip(names, procs, strict=True):
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"on http://[^:]+:(\d+) \(ready\)", line)
            if m:
                replicas.append(Replica(name, proc, int(m.group(1))))
                break
        else:
            for p in procs:
                p.kill()
            raise AssertionError(f"replica {name} did not start:\n" + "".join(lines))
    return replicas


def _start_test_backend(tmp: Path, name: str, mode: str) -> Replica:
    script = tmp / "test_backend.py"
    script.write_text(TEST_BACKEND)
    proc = subprocess.Popen([sys.executable, str(script), name, mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return Replica(name, proc, int(proc.stdout.readline()))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_iris(tmp_path_factory.mktemp("proxy-model"))


@pytest.fixture(scope="module")
def replicas(model: Path) -> Iterator[list[Replica]]:
    rs = _start_replicas(model, ["r1", "r2", "r3"])
    yield rs
    for r in rs:
        r.stop()


@pytest.fixture
def spawn(tmp_path: Path, model: Path) -> Iterator[Callable[..., Replica]]:
    """Start replicas for one test (model servers, or the misbehaving test backend); stop them after."""
    started: list[Replica] = []

    def start(name: str, mode: str | None = None) -> Replica:
        r = _start_test_backend(tmp_path, name, mode) if mode else _start_replicas(model, [name])[0]
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    log = tmp_path / "proxy.log"
    ep = Endpoint.start("iris", admin_port=0, log=log, check_interval=0.5, activation_timeout=0.0)
    try:
        yield ep
    finally:
        ep.stop()
        print(log.read_text(), file=sys.stderr)  # shown when a test fails


def _post(ep: Endpoint, path: str = INFER, body: bytes = BODY,
          conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    c = conn or http.client.HTTPConnection("127.0.0.1", ep.port, timeout=10)
    try:
        c.request("POST", path, body, {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        if conn is None:
            c.close()


def _load(ep: Endpoint, threads: int, seconds: float, path: str = INFER,
          max_requests: int = 20000) -> tuple[list[int], list[str]]:
    """Bounded load from ``threads`` keep-alive clients; returns (statuses, failures)."""
    statuses: list[int] = []
    failures: list[str] = []
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", ep.port, timeout=10)
        try:
            while time.monotonic() < deadline and len(statuses) < max_requests:
                try:
                    status, body = _post(ep, path, conn=conn)
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        failures.append(repr(exc))
                    conn.close()
                    continue
                with lock:
                    statuses.append(status)
                    if status != 200:
                        failures.append(f"{status} {body[:200]!r}")
        finally:
            conn.close()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return statuses, failures


def _raw(port: int, data: bytes, until: Callable[[bytes], bool], timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while not until(got):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def _complete(n: int) -> Callable[[bytes], bool]:
    """True once ``n`` Content-Length framed responses are in the buffer."""
    def done(buf: bytes) -> bool:
        count, pos = 0, 0
        while (end := buf.find(b"\r\n\r\n", pos)) >= 0:
            m = re.search(rb"(?i)content-length: *(\d+)", buf[pos:end])
            length = int(m.group(1)) if m else 0
            if len(buf) < end + 4 + length:
                return False
            count, pos = count + 1, end + 4 + length
        return count >= n
    return done


# -- relaying and balancing --------------------------------------------------------------------


def test_relays_inference_and_spreads_sequential_requests_evenly(
        endpoint: Endpoint, replicas: list[Replica]) -> None:
    endpoint.set_backends([r.backend() for r in replicas])
    conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=10)
    for _ in range(30):
        status, body = _post(endpoint, conn=conn)
        assert status == 200, body
        assert json.loads(body)["outputs"][0]["data"] == [0]
    conn.close()
    st = endpoint.status()
    # one at a time, every replica has nothing outstanding: ties rotate
    assert sorted(b.requests for b in st.backends) == [10, 10, 10]
    assert st.codes == {200: 30} and st.retries == 0
    assert all(b.outstanding == 0 and b.eligible for b in st.backends)


def test_a_slow_replica_gets_fewer_requests(endpoint: Endpoint, replicas: list[Replica],
                                            spawn: Callable[..., Replica]) -> None:
    slow = spawn("slow", "0.2")
    endpoint.set_backends([replicas[0].backend(), slow.backend()])
    statuses, failures = _load(endpoint, threads=4, seconds=2.0)
    assert not failures
    st = endpoint.status()
    fast_n, slow_n = st.backend("r1").requests, st.backend("slow").requests
    assert fast_n + slow_n == len(statuses)
    # round robin would give each half; least outstanding gives the slow one a trickle
    assert slow_n < 0.1 * fast_n, (fast_n, slow_n)
    assert slow_n > 0


def test_weighted_groups_split_traffic_like_a_canary(endpoint: Endpoint, replicas: list[Replica]) -> None:
    endpoint.set_backends([replicas[0].backend("v1"), replicas[1].backend("v1"), replicas[2].backend("v2")],
                          weights={"v1": 90, "v2": 10})
    statuses, failures = _load(endpoint, threads=4, seconds=30, max_requests=400)
    assert not failures
    st = endpoint.status()
    v2 = st.backend("r3").requests
    assert st.weights == {"v1": 90, "v2": 10}
    assert abs(v2 / len(statuses) - 0.10) < 0.03, (v2, len(statuses))
    endpoint.set_weights({"v1": 0, "v2": 100})  # promote the canary
    before = {b.id: b.requests for b in endpoint.status().backends}
    _load(endpoint, threads=2, seconds=30, max_requests=40)
    after = {b.id: b.requests for b in endpoint.status().backends}
    assert after["r1"] == before["r1"] and after["r2"] == before["r2"]
    assert after["r3"] >= before["r3"] + 40


# -- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_replica_dying_under_load_fails_no_request(sig: signal.Signals, endpoint: Endpoint,
                                                     replicas: list[Replica],
                                                     spawn: Callable[..., Replica]) -> None:
    victim = spawn("victim")
    endpoint.set_backends([replicas[0].backend(), replicas[1].backend(), victim.backend()])
    result: dict[str, tuple[list[int], list[str]]] = {}
    loader = threading.Thread(target=lambda: result.update(load=_load(endpoint, threads=4, seconds=3.0)))
    loader.start()
    time.sleep(1.0)
    assert endpoint.status().backend("victim").requests > 0  # it was taking its share
    victim.proc.send_signal(sig)  # SIGTERM: the model server drains, then exits
    victim.proc.wait(timeout=15)
    time.sleep(0.3)
    served_by_victim = endpoint.status().backend("victim").requests
    loader.join()
    statuses, failures = result["load"]
    assert not failures, failures[:5]
    assert len(statuses) > 200
    st = endpoint.status()
    dead = st.backend("victim")
    assert not dead.healthy and not dead.eligible and dead.outstanding == 0
    assert dead.requests == served_by_victim  # out of rotation: nothing more went there
    if sig == signal.SIGKILL:  # a draining replica may be caught by the health check first
        assert dead.failures >= 1 and st.upstream_errors >= 1 and st.retries >= 1
    print(f"{sig.name} under load: {len(statuses)} requests, {st.retries} retried, "
          f"{dead.failures} failures seen on the victim: {dead.last_error}")
    assert set(st.codes) == {200}


def test_a_replica_that_hangs_up_without_answering_costs_a_retry_not_an_error(
        endpoint: Endpoint, replicas: list[Replica], spawn: Callable[..., Replica]) -> None:
    dropper = spawn("dropper", "drop")
    endpoint.set_backends([dropper.backend(), replicas[0].backend()])
    statuses, failures = _load(endpoint, threads=2, seconds=30, max_requests=200)
    assert not failures and len(statuses) >= 200
    st = endpoint.status()
    assert st.retries >= 1 and st.backend("dropper").failures == st.retries
    assert st.backend("dropper").requests == 0
    assert "closed the connection before answering" in st.backend("dropper").last_error
    text = endpoint.metrics()
    assert f'uniframe_proxy_retries_total{{service="iris"}} {st.retries}' in text


def test_no_ready_replica_is_503_and_dead_replicas_502(endpoint: Endpoint) -> None:
    status, body = _post(endpoint)
    assert status == 503
    assert json.loads(body) == {"error": "service iris has no ready replica", "service": "iris",
                                "reason": "no-ready-replica"}
    dead = []
    for name in ("d1", "d2"):
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead.append(Backend(name, "127.0.0.1", s.getsockname()[1]))
    endpoint.set_backends(dead)
    status, body = _post(endpoint)
    assert status == 502
    error = json.loads(body)["error"]
    assert error.startswith("service iris: no replica answered")
    assert "d1 (127.0.0.1:" in error and "d2 (127.0.0.1:" in error and "refused the connection" in error
    status, body = _post(endpoint)  # both are out of rotation now
    assert status == 503 and b"has no ready replica" in body
    st = endpoint.status()
    assert not any(b.healthy for b in st.backends)
    assert st.codes == {503: 2, 502: 1}


def test_a_request_waits_briefly_for_a_replica_to_come(tmp_path: Path, replicas: list[Replica]) -> None:
    with Endpoint.start("iris", activation_timeout=5.0, log=tmp_path / "proxy.log") as ep:
        result: list[tuple[int, bytes]] = []
        t0 = time.monotonic()
        waiter = threading.Thread(target=lambda: result.append(_post(ep)))
        waiter.start()
        time.sleep(0.4)
        assert ep.status().held == 1
        ep.add(replicas[0].backend())
        waiter.join()
        assert result[0][0] == 200 and time.monotonic() - t0 >= 0.4
        assert ep.status().held == 0


def test_health_checks_take_a_draining_replica_out_and_bring_it_back(
        endpoint: Endpoint, model: Path, spawn: Callable[..., Replica]) -> None:
    a, b = spawn("a"), spawn("b")
    endpoint.set_backends([a.backend(), b.backend()])
    a.proc.send_signal(signal.SIGSTOP)  # hung: the health check times out
    try:
        deadline = time.monotonic() + 5
        while endpoint.status().backend("a").healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not endpoint.status().backend("a").healthy
        for _ in range(10):
            assert _post(endpoint)[0] == 200
        assert endpoint.status().backend("a").requests == 0
    finally:
        a.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 5
    while not endpoint.status().backend("a").healthy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert endpoint.status().backend("a").healthy


# -- draining ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["drain", "remove"])
def test_taking_a_replica_out_lets_its_requests_in_flight_finish(
        how: str, endpoint: Endpoint, replicas: list[Replica], spawn: Callable[..., Replica]) -> None:
    slow = spawn("slow", "0.8")
    endpoint.set_backends([slow.backend()])
    results: list[tuple[int, bytes]] = []
    clients = [threading.Thread(target=lambda: results.append(_post(endpoint))) for _ in range(3)]
    for c in clients:
        c.start()
    deadline = time.monotonic() + 5
    while endpoint.status().backend("slow").outstanding < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert endpoint.status().backend("slow").outstanding == 3
    endpoint.add(replicas[0].backend())
    if how == "drain":
        assert endpoint.drain("slow") is False  # three still in flight
    else:
        endpoint.remove("slow")
    t0 = time.monotonic()
    status, body = _post(endpoint)  # new work goes to the other replica at once
    assert status == 200 and b"outputs" in body and time.monotonic() - t0 < 0.5
    if how == "drain":
        assert endpoint.drain("slow", wait=5.0) is True
        assert endpoint.status().backend("slow").draining
        endpoint.remove("slow")
    for c in clients:
        c.join()
    assert [s for s, _ in results] == [200, 200, 200]
    assert all(json.loads(b) == {"who": "slow"} for _, b in results)
    st = endpoint.status()
    assert [b.id for b in st.backends] == ["r1"]
    assert st.codes == {200: 4}


# -- framing -----------------------------------------------------------------------------------


def test_chunked_binary_pipelined_and_continue_requests_pass_byte_exact(
        endpoint: Endpoint, replicas: list[Replica], spawn: Callable[..., Replica]) -> None:
    echo = spawn("echo", "0")
    endpoint.set_backends([echo.backend()])
    payload = bytes(range(256)) * 40 + b"\r\n0\r\n\r\n"  # binary, with a fake chunk end inside
    chunked = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Odd:  spaced \r\n\r\n"
               + b"".join(b"%x;ext=1\r\n%s\r\n" % (len(payload[i:i + 1000]), payload[i:i + 1000])
                          for i in range(0, len(payload), 1000))
               + b"0\r\nX-Trailer: t\r\n\r\n")
    answer = _raw(endpoint.port, chunked, _complete(1))
    assert answer.split(b"\r\n\r\n", 1)[1] == chunked  # the replica saw exactly what the client sent
    # a chunked response goes back unchanged too
    chunked_reply = _raw(echo.port, b"GET /chunked HTTP/1.1\r\n\r\n", lambda b: b.endswith(b"0\r\n\r\n"))
    assert _raw(endpoint.port, b"GET /chunked HTTP/1.1\r\n\r\n",
                lambda b: b.endswith(b"0\r\n\r\n")) == chunked_reply

    # binary tensor data (Inference-Header-Content-Length) to a model server, both ways
    endpoint.set_backends([replicas[0].backend()])
    header = json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 16}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    body = header + struct.pack("<4f", 5.1, 3.5, 1.4, 0.2)
    binary = (b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
              b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(header), len(body))
              + body)
    direct = _raw(replicas[0].port, binary, _complete(1))
    via = _raw(endpoint.port, binary, _complete(1))
    assert via == direct and b"Inference-Header-Content-Length" in via

    # pipelined: three requests in one write, three answers in order
    json_req = (b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                % (len(BODY), BODY))
    health = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    got = _raw(endpoint.port, json_req + health + binary, _complete(3))
    assert got == _raw(replicas[0].port, json_req + health + binary, _complete(3))
    assert got.count(b"HTTP/1.1 200 OK") == 3

    # Expect: 100-continue: the endpoint says go on, and the answer follows the body
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as s:
        s.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(BODY))
        assert s.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(BODY)
        got = b""
        while not _complete(1)(got):
            got += s.recv(65536)
        assert got.startswith(b"HTTP/1.1 200 OK") and b'"data":[0]' in got


def test_large_bodies_stream_through_and_a_slow_reader_holds_back_only_itself(
        endpoint: Endpoint, spawn: Callable[..., Replica]) -> None:
    echo = spawn("echo", "0")
    endpoint.set_backends([echo.backend()])
    payload = bytes(range(256)) * (9 << 12)  # 9 MiB each way: many partial sends on every hop
    req = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
    assert _raw(endpoint.port, req, _complete(1), timeout=30).split(b"\r\n\r\n", 1)[1] == req
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=30) as slow_reader:
        slow_reader.sendall(req)
        time.sleep(0.5)  # it reads nothing for a while; the endpoint keeps serving others
        t0 = time.monotonic()
        assert _post(endpoint, "/echo", b"hi")[0] == 200
        assert time.monotonic() - t0 < 1.0
        got = b""
        while not _complete(1)(got):
            chunk = slow_reader.recv(1 << 16)
            assert chunk
            got += chunk
        assert got.split(b"\r\n\r\n", 1)[1] == req


def test_malformed_requests_are_refused_by_the_endpoint(endpoint: Endpoint, replicas: list[Replica]) -> None:
    endpoint.set_backends([replicas[0].backend()])
    smuggle = (b"POST /v2/models/iris/infer HTTP/1.1\r\nContent-Length: 5\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    got = _raw(endpoint.port, smuggle, lambda b: False)
    assert got.startswith(b"HTTP/1.1 400 Bad Request") and b"Connection: close" in got
    assert b"both Content-Length and Transfer-Encoding" in got
    assert endpoint.status().backend("r1").requests == 0  # nothing reached the replica


# -- control -----------------------------------------------------------------------------------


def test_control_errors_metrics_and_attach(endpoint: Endpoint, replicas: list[Replica]) -> None:
    with pytest.raises(EndpointError, match="service iris has no backend 'nope'"):
        endpoint.remove("nope")
    with pytest.raises(EndpointError, match=r"port must be 1\.\.65535"):
        endpoint.add(Backend("bad", "127.0.0.1", 0))
    with pytest.raises(EndpointError, match="weights must map group names"):
        endpoint.set_weights({"v1": -1})
    endpoint.add(replicas[0].backend())
    assert _post(endpoint)[0] == 200
    assert endpoint.admin_port is not None
    conn = http.client.HTTPConnection("127.0.0.1", endpoint.admin_port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    assert 'uniframe_proxy_requests_total{service="iris",code="200"} 1' in text
    assert 'uniframe_proxy_backend_outstanding{service="iris",backend="r1",group="default"} 0' in text
    other = Endpoint.attach(endpoint.control_path)
    try:
        assert (other.service, other.port) == ("iris", endpoint.port)
        other.set_ready("r1", False)
        assert _post(endpoint)[0] == 503  # the reconciler's word counts as much as our checks
        endpoint.set_ready("r1", True)
        assert _post(endpoint)[0] == 200
    finally:
        other.close()


def test_start_failure_is_reported(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(EndpointError, match=r"did not start on 127\.0\.0\.1:\d+.*proxy\.log"):
            Endpoint.start("iris", port=busy.getsockname()[1], log=tmp_path / "proxy.log")
        assert "cannot listen on" in (tmp_path / "proxy.log").read_text()
