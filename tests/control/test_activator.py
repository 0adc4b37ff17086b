"""The activator in a real endpoint process, over real HTTP: hold, release, refuse, tell, drain.

A service with no ready replica (scaled to zero, or all replicas starting)
holds requests instead of failing them, releases them to the first replica
that is ready, and tells the daemon once per burst on a subscribed control
connection. Replicas here are small standard-library HTTP servers in this
process, because what matters is what the endpoint does with the requests
(when, to whom, in which order), not inference.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from uniframe.control.proxy import Backend, Endpoint, EndpointError

BODY = b'{"inputs": []}'
INFER = "/v2/models/iris/infer"


class _Replica(BaseHTTPRequestHandler):
    """Health checks answer 200; a POST is recorded, answered after the server's delay."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(b'{"ready": true}')

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server: Any = self.server
        with server.lock:
            server.seen.append(self.path)
        time.sleep(server.delay)
        self._answer(json.dumps({"who": server.name, "path": self.path}).encode())

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _OneAtATime(_Replica):
    """HTTP/1.0, one connection after another: requests are seen in the order they were sent."""

    protocol_version = "HTTP/1.0"


class _Recording(HTTPServer):
    """A replica that keeps the paths of the inference requests it was sent, in order."""

    def __init__(self, name: str, delay: float, handler: type[_Replica]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.name, self.delay = name, delay
        self.seen: list[str] = []
        self.lock = threading.Lock()


class _Threaded(socketserver.ThreadingMixIn, _Recording):
    daemon_threads = True


@pytest.fixture
def replicas() -> Iterator[list[_Recording]]:
    made: list[_Recording] = []
    yield made
    for server in made:
        server.shutdown()
        server.server_close()


def _replica(made: list[_Recording], name: str, delay: float = 0.0, *,
             in_order: bool = False) -> _Recording:
    server = (_Recording(name, delay, _OneAtATime) if in_order
              else _Threaded(name, delay, _Replica))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    made.append(server)
    return server


def _backend(server: HTTPServer, name: str, ready: bool = True) -> Backend:
    return Backend(name, "127.0.0.1", server.server_address[1], ready=ready)


def _post(port: int, path: str = INFER, timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, BODY, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        conn.close()


def _send_raw(port: int, path: str = INFER) -> socket.socket:
    """A request sent on a socket of its own, its answer left to read later (no thread needed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: iris\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(BODY), BODY))
    return sock


def _answer(sock: socket.socket) -> tuple[int, Any]:
    resp = http.client.HTTPResponse(sock)
    try:
        resp.begin()
        return resp.status, json.loads(resp.read())
    finally:
        sock.close()


def _events(sock: socket.socket, within: float) -> list[tuple[float, dict[str, Any]]]:
    """Event lines arriving on a subscription within ``within`` seconds, with their arrival time."""
    out: list[tuple[float, dict[str, Any]]] = []
    buf = b""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        data = sock.recv(4096)
        if not data:
            break
        now = time.monotonic()
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            out.append((now, json.loads(line)))
    return out


def _until(what: str, check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.01)


def test_held_requests_go_to_the_first_ready_replica_in_arrival_order(
        tmp_path: Path, replicas: list[_Recording]) -> None:
    starting = _replica(replicas, "first", in_order=True)
    with Endpoint.start("iris", activation_timeout=20, log=tmp_path / "proxy.log") as ep:
        ep.set_backends([_backend(starting, "first", ready=False)])  # starting: not ready yet
        sent = [_send_raw(ep.port, f"{INFER}?n={i}") for i in range(6)]  # one after another
        _until("six requests held", lambda: ep.status().held == 6)
        time.sleep(0.3)
        assert starting.seen == []  # not one went to a replica the reconciler calls not ready

        ep.set_ready("first", True)  # the reconciler probed it ready
        answers = [_answer(s) for s in sent]
        assert [status for status, _ in answers] == [200] * 6
        assert starting.seen == [f"{INFER}?n={i}" for i in range(6)]  # released in arrival order
        st = ep.status()
        assert (st.held, st.in_flight, st.codes) == (0, 0, {200: 6})


def test_a_request_held_past_the_activation_timeout_is_503_with_retry_after(tmp_path: Path) -> None:
    with Endpoint.start("iris", activation_timeout=0.6, retry_after=3,
                        log=tmp_path / "proxy.log") as ep:
        began = time.monotonic()
        status, headers, body = _post(ep.port)
        waited = time.monotonic() - began
        assert status == 503 and 0.5 <= waited < 2.0, (status, waited)
        assert headers["Retry-After"] == "3"
        assert body == {"error": "service iris has no ready replica: none became ready within the "
                                 "activation timeout of 0.6 s",
                        "service": "iris", "reason": "activation-timeout"}
        assert ep.status().held == 0
        assert 'uniframe_proxy_requests_total{service="iris",code="503"} 1' in ep.metrics()


def test_the_hold_queue_is_bounded_and_one_more_is_refused_at_once(
        tmp_path: Path, replicas: list[_Recording]) -> None:
    with Endpoint.start("iris", activation_timeout=20, queue_limit=3,
                        log=tmp_path / "proxy.log") as ep:
        held = [_send_raw(ep.port) for _ in range(3)]
        _until("three held", lambda: ep.status().held == 3)
        began = time.monotonic()
        status, headers, body = _post(ep.port)
        assert status == 503 and time.monotonic() - began < 0.5
        assert headers["Retry-After"] == "1"
        assert body["reason"] == "queue-full" and body["service"] == "iris"
        assert "already holds 3 requests" in body["error"]

        held[0].close()  # a client that gives up frees its place
        _until("two held", lambda: ep.status().held == 2)
        again = _send_raw(ep.port)
        _until("three held again", lambda: ep.status().held == 3)

        ep.add(_backend(_replica(replicas, "late"), "late"))
        assert [_answer(s)[0] for s in [*held[1:], again]] == [200, 200, 200]


def test_the_daemon_is_told_once_per_burst_within_milliseconds(
        tmp_path: Path, replicas: list[_Recording]) -> None:
    with Endpoint.start("iris", activation_timeout=20, log=tmp_path / "proxy.log") as ep:
        events = ep.subscribe()
        try:
            began = time.monotonic()
            burst = [_send_raw(ep.port)]
            first = _events(events, 1.0)
            assert len(first) == 1, first
            latency = first[0][0] - began
            assert first[0][1] == {"event": "demand", "service": "iris", "held": 1}
            assert latency < 0.1, f"the demand line took {latency * 1000:.1f} ms"

            burst += [_send_raw(ep.port) for _ in range(19)]  # the rest of the burst: no more lines
            _until("twenty held", lambda: ep.status().held == 20)
            assert _events(events, began + 1.5 - time.monotonic()) == []
            # still held two seconds on, still no replica: one reminder, in case the wake was missed
            reminder = _events(events, began + 2.6 - time.monotonic())
            assert [e for _, e in reminder] == [{"event": "demand", "service": "iris", "held": 20}]

            ep.add(_backend(_replica(replicas, "r"), "r"))
            assert Counter(_answer(s)[0] for s in burst) == {200: 20}
            time.sleep(0.3)  # the burst is over once nothing is held

            second = [_send_raw(ep.port) for _ in range(1)]
            assert [s for s, _ in [_answer(x) for x in second]] == [200]
            assert _events(events, 0.3) == []  # a replica is ready: no demand at all

            ep.remove("r")  # to zero again: the next burst is announced again, once
            began = time.monotonic()
            third = [_send_raw(ep.port) for _ in range(5)]
            lines = _events(events, 1.0)
            assert [e["held"] for _, e in lines] == [1], lines
            assert lines[0][0] - began < 0.1
            assert ep.status().demands == 3
            for s in third:
                s.close()
        finally:
            events.close()
        print(f"demand line {latency * 1000:.2f} ms after the first held request was sent")


def test_a_new_subscriber_is_told_at_once_that_requests_are_held(tmp_path: Path) -> None:
    """How a wake survives a daemon restart: the new daemon subscribes and hears it at once."""
    with Endpoint.start("iris", activation_timeout=20, log=tmp_path / "proxy.log") as ep:
        held = _send_raw(ep.port)
        _until("one held", lambda: ep.status().held == 1)
        began = time.monotonic()
        events = ep.subscribe()
        try:
            lines = _events(events, 0.5)
            assert [e for _, e in lines] == [{"event": "demand", "service": "iris", "held": 1}]
            assert lines[0][0] - began < 0.1
        finally:
            events.close()
            held.close()


def test_a_starting_replica_that_answers_while_requests_are_held_wakes_the_daemon(
        tmp_path: Path, replicas: list[_Recording]) -> None:
    """So its readiness probe runs now, not at the reconciler's next periodic pass."""
    with socket.socket() as reserved:  # the replica's port, taken but not listening yet
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        with Endpoint.start("iris", activation_timeout=20, log=tmp_path / "proxy.log") as ep:
            events = ep.subscribe()
            held = _send_raw(ep.port)
            try:
                assert len(_events(events, 0.3)) == 1  # the demand
                ep.add(Backend("starting", "127.0.0.1", port, ready=False))
                _until("its check is refused", lambda: not ep.status().backend("starting").healthy)
                assert _events(events, 0.3) == []  # refused: nothing to say
                reserved.close()
                server = _Threaded("starting", 0.0, _Replica)
                server.server_close()
                server.socket = socket.create_server(("127.0.0.1", port))
                threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                 daemon=True).start()
                replicas.append(server)
                began = time.monotonic()
                lines = _events(events, 0.5)  # well before the 2 s reminder
                assert [e["event"] for _, e in lines] == ["demand"], lines
                assert lines[0][0] - began < 0.3  # checked every 20 ms while requests are held
                assert ep.status().held == 1  # still the reconciler's word that releases it
                ep.set_ready("starting", True)
                assert _answer(held)[0] == 200
            finally:
                events.close()
                held.close()


def test_scaling_to_zero_drains_first_and_loses_no_request(
        tmp_path: Path, replicas: list[_Recording]) -> None:
    """What the reconciler does to the last replica, under concurrent clients: drain (no new
    requests, those in flight finish), stop, remove; meanwhile new requests are held, and a
    replica started for them answers them."""
    last = _replica(replicas, "last", delay=0.2)
    results: list[tuple[int, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                status, _, body = _post(ep.port)
                got = (status, body.get("who", body.get("error", "")))
            except OSError as exc:
                got = (0, f"{type(exc).__name__}: {exc}")
            with lock:
                results.append(got)

    with Endpoint.start("iris", activation_timeout=20, log=tmp_path / "proxy.log") as ep:
        ep.set_backends([_backend(last, "last")])
        clients = [threading.Thread(target=client) for _ in range(6)]
        for c in clients:
            c.start()
        try:
            _until("requests in flight", lambda: ep.status().in_flight >= 4)
            assert ep.drain("last", wait=5.0) is True  # its requests in flight all finished
            _until("every client held", lambda: ep.status().held == 6)
            last.shutdown()  # the replica stops, and is removed from the endpoint
            last.server_close()
            replicas.remove(last)
            ep.set_backends([])
            time.sleep(0.5)
            st = ep.status()
            assert (st.held, st.in_flight, st.codes.get(503, 0)) == (6, 0, 0)

            ep.set_backends([_backend(_replica(replicas, "woken"), "woken")])
            _until("the woken replica answers", lambda: any(w == "woken" for _, w in results))
            time.sleep(0.3)
        finally:
            stop.set()
            for c in clients:
                c.join(30)
    failed = [r for r in results if r[0] != 200]
    assert failed == [], failed[:5]
    who = Counter(w for _, w in results)
    assert who["last"] >= 4 and who["woken"] >= 6, who  # four at least were in flight at drain


def test_configure_changes_the_hold_and_refuses_nonsense(tmp_path: Path) -> None:
    with Endpoint.start("iris", activation_timeout=20, log=tmp_path / "proxy.log") as ep:
        held = _send_raw(ep.port)
        _until("one held", lambda: ep.status().held == 1)
        ep.configure(activation_timeout=0.2)  # applies to what is held already
        assert _answer(held) == (503, {
            "error": "service iris has no ready replica: none became ready within the activation "
                     "timeout of 0.2 s", "service": "iris", "reason": "activation-timeout"})
        ep.configure(activation_timeout=0, queue_limit=5, retry_after=7)
        st = ep.status()
        assert (st.activation_timeout, st.queue_limit) == (0.0, 5)
        status, headers, body = _post(ep.port)  # 0: no holding, 503 at once
        assert (status, headers["Retry-After"], body["reason"]) == (503, "7", "no-ready-replica")
        with pytest.raises(EndpointError, match="activation_timeout must be seconds"):
            ep.configure(activation_timeout=-1)
        with pytest.raises(EndpointError, match="queue_limit must be a non-negative integer"):
            ep._call({"op": "configure", "queue_limit": "many"})
