"""The HTTP face of a fake replica: just enough of the OIP v2 protocol for the control plane.

The reconciler judges a replica by HTTP (``/v2/models/{name}/ready``), the
service endpoint forwards inference to it, and a Workload may be probed by a
TCP connect: a fake replica that only *said* it was ready would test none of
that. So each running fake replica listens on its published host ports with
a small threaded server in this process, and answers from the simulated
replica's state (:class:`Answers`): ready or not, which model, hung or not.
Inference answers are fixed and deterministic (one zero label per input
row), because the subject of a control-plane test is who answers, not what.
"""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any, Protocol

__all__ = ["Answers", "ReplicaServer", "fake_outputs"]


class Answers(Protocol):
    """What the simulated replica decides; the server only speaks HTTP for it."""

    def ready(self) -> bool: ...

    def serves(self, model: str) -> bool: ...

    def model_version(self) -> str: ...

    def hold(self) -> bool:
        """Block while the replica is hung (a stopped process does not answer); then say
        whether it is still alive to answer at all."""

    def note(self, line: str) -> None:
        """Append one line to the replica's log."""

    def answered(self) -> int:
        """Count one inference; return how many this replica (and its snapshot) served."""


def fake_outputs(model: str, version: str, body: dict[str, Any], count: int) -> dict[str, Any]:
    """The fake's answer to an inference: a zero label per row of the first input."""
    inputs = body.get("inputs") or [{}]
    shape = inputs[0].get("shape") or [1]
    rows = int(shape[0]) if shape and isinstance(shape[0], int) and shape[0] > 0 else 1
    return {"model_name": model, "model_version": version, "id": str(count),
            "outputs": [{"name": "label", "datatype": "INT64", "shape": [rows],
                         "data": [0] * rows}]}


def _handler(answers: Answers) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, body: dict[str, Any] | None = None) -> None:
            raw = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            answers.note(f"{self.command} {self.path} {status}")

        def _held(self) -> bool:
            """Wait out a hang; a replica that died meanwhile drops the connection."""
            if answers.hold():
                return True
            self.close_connection = True
            return False

        def do_GET(self) -> None:
            if not self._held():
                return
            parts = self.path.split("?", 1)[0].strip("/").split("/")
            if parts == ["v2", "health", "live"]:
                self._reply(200)
            elif parts == ["v2", "health", "ready"]:
                self._reply(200 if answers.ready() else 503)
            elif len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "ready":
                known = answers.serves(parts[2])
                self._reply(404 if not known else 200 if answers.ready() else 503)
            elif len(parts) == 3 and parts[:2] == ["v2", "models"] and answers.serves(parts[2]):
                self._reply(200, {"name": parts[2], "versions": [answers.model_version()],
                                  "platform": "fake"})
            else:
                self._reply(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            if not self._held():
                return
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            parts = self.path.split("?", 1)[0].strip("/").split("/")
            if not (len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "infer"):
                self._reply(404, {"error": f"no route {self.path}"})
                return
            if not answers.serves(parts[2]):
                self._reply(404, {"error": f"model {parts[2]!r} is not served here"})
                return
            if not answers.ready():
                self._reply(503, {"error": "not ready"})
                return
            try:
                body = json.loads(raw or b"{}")
            except ValueError as exc:
                self._reply(400, {"error": f"invalid JSON: {exc}"})
                return
            self._reply(200, fake_outputs(parts[2], answers.model_version(), body,
                                          answers.answered()))

        def log_message(self, *_args: Any) -> None:
            pass  # every request is noted in the replica's own log instead

    return Handler


class ReplicaServer:
    """Threaded HTTP servers on a replica's published ports; :meth:`close` frees them all."""

    def __init__(self, addresses: list[tuple[str, int]], answers: Answers) -> None:
        handler = _handler(answers)
        self._running: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []
        try:
            for address in addresses:
                server = http.server.ThreadingHTTPServer(address, handler, bind_and_activate=False)
                server.daemon_threads = True
                server.allow_reuse_address = True
                try:
                    server.server_bind()
                    server.server_activate()
                except OSError:
                    server.server_close()
                    raise
                thread = threading.Thread(target=server.serve_forever,
                                          kwargs={"poll_interval": 0.05}, daemon=True,
                                          name=f"fake-replica-{address[1]}")
                thread.start()
                self._running.append((server, thread))
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """Stop listening (requests under way may still finish: the process is gone, not them)."""
        running, self._running = self._running, []
        for server, thread in running:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
