"""A replica the reconciler reports ready takes its share at once, whatever the endpoint saw before.

The endpoint health-checks every backend, ready or not, so a replica that
is still starting fails its checks (connection refused) and is held out
until a recheck passes. When the reconciler then probes it ready and says
so, the rollout is already ``paused`` with "canary ready: 1 replica(s) take
50% of requests"; the endpoint must not keep sending that share to the old
version until its own next recheck (0.25 s by default, seconds under load).
That stale verdict is what made the canary test in ``test_rollouts.py``
measure a share far below 50 % when it counted requests right after the
canary became ready. Here the recheck is a minute away, so a stale verdict
could not be missed.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from uniframe.control.proxy import Backend, Endpoint


class _Named(BaseHTTPRequestHandler):
    """Answers every GET with the server's name (health checks included)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def servers() -> Iterator[list[ThreadingHTTPServer]]:
    made: list[ThreadingHTTPServer] = []
    yield made
    for server in made:
        if getattr(server, "serving", False):  # shutdown() waits for a serve_forever that never ran
            server.shutdown()
        server.server_close()


def _server(made: list[ThreadingHTTPServer], name: str, *, listen: bool) -> ThreadingHTTPServer:
    """A named replica; with ``listen=False`` its port is held but refuses connections."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Named, bind_and_activate=False)
    server.name = name  # type: ignore[attr-defined]
    server.server_bind()
    made.append(server)
    if listen:
        _listen(server)
    return server


def _listen(server: ThreadingHTTPServer) -> None:
    server.server_activate()
    server.serving = True  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()


def _get(ep: Endpoint) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", ep.port, timeout=10)
    try:
        conn.request("GET", "/v2/models/iris/ready")
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read().decode()
    finally:
        conn.close()


def test_a_canary_reported_ready_gets_its_share_at_once(
        tmp_path: Path, servers: list[ThreadingHTTPServer]) -> None:
    old = _server(servers, "old", listen=True)
    canary = _server(servers, "canary", listen=False)  # still starting: nothing listens yet
    weights = {"v1": 50, "v2": 50}

    def backends(canary_ready: bool) -> list[Backend]:
        return [Backend("old", "127.0.0.1", old.server_address[1], group="v1", ready=True),
                Backend("canary", "127.0.0.1", canary.server_address[1], group="v2",
                        ready=canary_ready)]

    with Endpoint.start("iris", check_interval=60.0, recheck_interval=60.0,
                        log=tmp_path / "proxy.log") as ep:
        ep.set_backends(backends(False), weights)
        deadline = time.monotonic() + 10
        while ep.status().backend("canary").healthy:  # its first check is refused
            assert time.monotonic() < deadline, ep.status()
            time.sleep(0.02)

        _listen(canary)  # the server is up; the reconciler probes it and says so
        ep.set_backends(backends(True), weights)

        assert ep.status().backend("canary").eligible
        assert Counter(_get(ep) for _ in range(10)) == {"old": 5, "canary": 5}


def test_a_replica_the_endpoint_found_down_is_not_trusted_on_every_sync(
        tmp_path: Path, servers: list[ThreadingHTTPServer]) -> None:
    """Only the turn to ready is trusted: the reconciler repeating "ready" on each pass does
    not override the endpoint's own finding that a ready replica stopped answering."""
    gone = _server(servers, "gone", listen=False)
    with Endpoint.start("iris", check_interval=60.0, recheck_interval=60.0,
                        log=tmp_path / "proxy.log") as ep:
        backend = Backend("gone", "127.0.0.1", gone.server_address[1], ready=True)
        ep.set_backends([backend])
        deadline = time.monotonic() + 10
        while ep.status().backend("gone").healthy:
            assert time.monotonic() < deadline, ep.status()
            time.sleep(0.02)
        ep.set_backends([backend])
        assert not ep.status().backend("gone").healthy
