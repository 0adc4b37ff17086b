"""The daemon: the API over HTTP, and the reconciler in a background thread.

This module only frames: it matches a request against the route table
(:mod:`uniframe.control.api_routes`), reads the body a route wants, and
writes the reply as JSON, text or a chunked stream; every error becomes a
JSON ``{"error": ...}`` with its status. The standard library's threading
HTTP server is enough for a control API (a handful of requests per second,
one thread per followed log); the data path is the per-service proxy, never
this process. The daemon can be killed at any moment without losing what
was applied: the store has it, and the replicas run in their own sessions.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from uniframe.control.api import Api, ApiError
from uniframe.control.api_routes import Reply, Request, Route, find_route
from uniframe.control.openapi import OPENAPI
from uniframe.control.reconciler import Reconciler
from uniframe.control.store import Store
from uniframe.errors import ConflictError, ModelError, NotFoundError, SpecError, UniframeError

__all__ = ["MAX_BODY", "MAX_UPLOAD", "OPENAPI", "Api", "Daemon"]

MAX_BODY = 4 << 20
"""Spec documents are small; anything bigger is a mistake (a model sent to /v1/apply)."""
MAX_UPLOAD = 8 << 30
"""Model files are streamed to disk, never held in memory; this only stops a runaway client."""

_STATUS_OF: tuple[tuple[type[UniframeError], HTTPStatus], ...] = (
    (NotFoundError, HTTPStatus.NOT_FOUND),
    (ConflictError, HTTPStatus.CONFLICT),
    (SpecError, HTTPStatus.UNPROCESSABLE_ENTITY),
    (ModelError, HTTPStatus.UNPROCESSABLE_ENTITY),
)


def _status_of(exc: UniframeError) -> HTTPStatus:
    for cls, status in _STATUS_OF:
        if isinstance(exc, cls):
            return status
    return HTTPStatus.INTERNAL_SERVER_ERROR


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _client_left(self) -> bool:
        """True once the client closed its side (it never sends anything while it reads)."""
        conn: socket.socket = self.connection
        with contextlib.suppress(OSError):
            readable, _, _ = select.select([conn], [], [], 0)
            if not readable:
                return False
            return conn.recv(1, socket.MSG_PEEK) == b""
        return True

    def _stream(self, status: int, chunks: Iterator[bytes], content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                elif self._client_left():
                    self.close_connection = True
                    return
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _length(self, limit: int) -> int:
        header = self.headers.get("Content-Length")
        if header is None:
            if self.headers.get("Transfer-Encoding"):
                raise ApiError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
            return 0
        try:
            length = int(header)
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"Content-Length {header!r} is not a number") from None
        if length > limit:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the body is {length} bytes, over the limit of {limit}")
        return length

    def _read_text(self) -> str:
        raw = self.rfile.read(self._length(MAX_BODY))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body is not UTF-8 text") from None

    def _read_file(self, directory: Path) -> Path:
        left = self._length(MAX_UPLOAD)
        path = directory / "upload"
        with path.open("wb") as fh:
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    raise ApiError(HTTPStatus.BAD_REQUEST, "the body ended early")
                fh.write(chunk)
                left -= len(chunk)
        return path

    def _request(self, route: Route, params: dict[str, str], query: dict[str, list[str]],
                 scratch: Path) -> Request:
        if route.body == "text":
            return Request(params, query, text=self._read_text())
        if route.body == "file":
            return Request(params, query, file=self._read_file(scratch))
        if self._length(MAX_BODY):
            self.close_connection = True  # an unexpected body stays unread
        return Request(params, query)

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        api = self.server.api
        try:
            with tempfile.TemporaryDirectory(prefix="uniframe-api-") as scratch:
                try:
                    route, params = find_route(method, url.path)
                    query = parse_qs(url.query, keep_blank_values=True)
                    request = self._request(route, params, query, Path(scratch))
                except ApiError:
                    self.close_connection = True  # the body, if any, was not read
                    raise
                reply = route.handler(api, request)
                if not isinstance(reply, Reply):
                    reply = Reply(reply)
                if isinstance(reply.body, dict):
                    self._send_json(reply.status, reply.body)
                elif isinstance(reply.body, str):
                    self._send(reply.status, reply.body.encode(), reply.content_type)
                else:
                    self._stream(reply.status, reply.body, reply.content_type)
        except ApiError as exc:
            self._send_json(exc.status, exc.body)
        except UniframeError as exc:
            self._send_json(_status_of(exc), {"error": str(exc)})
        except Exception as exc:  # a bug: say so in JSON, keep the details in the daemon's log
            traceback.print_exc(file=sys.stderr)
            self._send_json(500, {"error": f"internal error in the daemon ({type(exc).__name__}: "
                                           f"{exc}); see the daemon's log"})

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def do_DELETE(self) -> None:
        self._route("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: Api) -> None:
        self.api = api
        super().__init__(address, _Handler)


class Daemon:
    """The API server and the reconciler thread, started and stopped together."""

    def __init__(self, store: Store, reconciler: Reconciler, host: str, port: int, *,
                 period: float = 1.0) -> None:
        self.store = store
        self.reconciler = reconciler
        self.api = Api(store, reconciler)
        self.api.registry.sync()  # repair what a crash between index and files left behind
        self.server = _Server((host, port), self.api)
        self._thread = threading.Thread(target=reconciler.run, args=(period,),
                                        name="reconciler", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`; the replicas keep running after the daemon stops."""
        self._thread.start()
        try:
            self.server.serve_forever(poll_interval=0.2)
        finally:
            self.reconciler.stop()
            self._thread.join(timeout=30)
            self.server.server_close()

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.server.shutdown()
