"""The daemon: the API over HTTP, and the reconciler in a background thread.

This module only frames: it checks who is asking (:mod:`uniframe.control.api.auth`),
matches a request against the route table (:mod:`uniframe.control.api.routes`),
reads the body a route wants, and writes the reply as JSON, text or a chunked
stream; every error, down to a malformed request line, becomes a JSON
``{"error": ...}`` with its status. The standard library's threading HTTP
server is enough for a control API (a handful of requests per second, one
thread per followed log); the data path is the per-service proxy, never this
process.

It listens on a unix socket in its state directory (0600, the CLI's default
transport) and, when asked, on TCP (the token always; off loopback TLS too,
or an explicit, loudly logged ``insecure_no_tls``). Every route needs the
bearer token. A reply that ends the connection says ``Connection: close``,
so a client reusing connections never races a close; a reply to a request
whose body was read keeps the connection open.

The daemon can be killed at any moment without losing what was applied: the
store has it, and the replicas run in their own sessions.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from uniframe.control.api import auth
from uniframe.control.api.methods import Api, ApiError
from uniframe.control.api.openapi import OPENAPI
from uniframe.control.api.routes import Reply, Request, Route, find_route
from uniframe.control.api.uploads import Uploads
from uniframe.control.hostpaths import PathPolicy
from uniframe.control.proxy.unixsock import bind_private
from uniframe.control.reconciler import Reconciler
from uniframe.control.store import Store
from uniframe.errors import (
    ConflictError,
    CredentialError,
    ModelError,
    NotFoundError,
    SpecError,
    UniframeError,
)

__all__ = ["MAX_BODY", "MAX_UPLOAD", "OPENAPI", "Api", "Daemon", "DaemonConfig"]

MAX_BODY = 4 << 20
"""Spec documents are small; anything bigger is a mistake (a model sent to /v1/apply)."""
MAX_UPLOAD = 64 << 30
"""Uploads are streamed to disk, never held in memory; this only stops a runaway client."""
_DRAIN_LIMIT = 64 << 10
"""An unread body up to this size is read and dropped so the connection can stay open."""

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


@dataclass(frozen=True)
class DaemonConfig:
    """Where the daemon listens and whom it lets in.

    ``socket`` None: no unix socket; ``listen`` None: no TCP listener (at
    least one of the two). ``allow_paths`` are the host directories specs may
    name besides the daemon's own uploads.
    """

    socket: Path | None = field(default_factory=auth.default_socket)
    listen: tuple[str, int] | None = None
    token_file: Path = field(default_factory=auth.default_token_file)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_no_tls: bool = False
    allow_hosts: tuple[str, ...] = ()
    allow_paths: tuple[Path, ...] = ()

    def check(self) -> None:
        if self.socket is None and self.listen is None:
            raise CredentialError("give the daemon somewhere to listen: a unix socket, "
                                       "--listen HOST:PORT, or both")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CredentialError("TLS needs both --tls-cert FILE and --tls-key FILE")
        if self.listen is not None and self.tls_cert is None and not self.insecure_no_tls \
                and not auth.is_loopback(self.listen[0]):
            raise auth.tls_required_error(self.listen[0])


class _Handler(BaseHTTPRequestHandler):
    server: _Listener
    protocol_version = "HTTP/1.1"
    _body_read = False

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are not logged: nothing here may ever print a header (the token)

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, body: dict[str, Any],
                   headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(body).encode(), "application/json", headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unknown method, huge headers) in JSON."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # a garbled request line would mean HTTP/0.9: no head
        text = message or HTTPStatus(code).phrase
        with contextlib.suppress(OSError):
            self._send_json(code, {"error": f"{text} ({explain})" if explain else text})

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
        if self.headers.get("Transfer-Encoding"):  # it would override any Content-Length
            self.close_connection = True
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, "
                           "not Transfer-Encoding")
        values = set(self.headers.get_all("Content-Length") or [])
        if len(values) > 1:
            self.close_connection = True
            raise ApiError(HTTPStatus.BAD_REQUEST, "the request has conflicting Content-Length "
                           "headers")
        header = values.pop() if values else None
        if header is None:
            return 0
        try:
            length = int(header)
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"Content-Length {header!r} is not a number") from None
        if length < 0:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"Content-Length {header!r} is negative")
        if length > limit:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the body is {length} bytes, over the limit of {limit}")
        return length

    def _drain(self) -> None:
        """Read and drop a small unread body so the connection stays usable; else close it."""
        if self._body_read:
            return
        self._body_read = True
        try:
            length = self._length(_DRAIN_LIMIT)
        except ApiError:
            self.close_connection = True
            return
        if length and len(self.rfile.read(length)) != length:
            self.close_connection = True

    def _read_text(self) -> str:
        length = self._length(MAX_BODY)
        self._body_read = True
        raw = self.rfile.read(length)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body is not UTF-8 text") from None

    def _read_file(self, directory: Path) -> Path:
        left = self._length(MAX_UPLOAD)
        self._body_read = True
        path = directory / "upload"
        with path.open("wb") as fh:
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    self.close_connection = True
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
        self._drain()
        return Request(params, query)

    def _authorize(self) -> None:
        """The credential, the Host and the absence of a browser, before anything else runs."""
        server = self.server
        policy = server.host_policy
        if policy is not None and not policy.allows(self.headers.get("Host")):
            raise ApiError(HTTPStatus.FORBIDDEN,
                           f"Host {self.headers.get('Host')!r} is not a name of this daemon; "
                           "use its address, or start it with --allow-host NAME")
        if self.headers.get("Origin") is not None:
            raise ApiError(HTTPStatus.FORBIDDEN, "requests from web pages (an Origin header) are "
                           "refused; use the uniframe CLI or an API client")
        if not auth.bearer_matches(self.headers.get("Authorization"), server.token):
            raise ApiError(HTTPStatus.UNAUTHORIZED,
                           "this API needs the daemon's token: send 'Authorization: Bearer "
                           f"TOKEN' (the daemon keeps it in {server.token_file}, readable by its "
                           "user; the CLI reads it from there or from $UNIFRAME_TOKEN)")

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        api = self.server.api
        headers: dict[str, str] = {}
        self._body_read = False
        try:
            with tempfile.TemporaryDirectory(prefix="uniframe-api-") as scratch:
                try:
                    self._authorize()
                    route, params = find_route(method, url.path)
                    query = parse_qs(url.query, keep_blank_values=True)
                    request = self._request(route, params, query, Path(scratch))
                except ApiError as exc:
                    if exc.status == HTTPStatus.UNAUTHORIZED:
                        headers["WWW-Authenticate"] = auth.REALM
                    if exc.status == HTTPStatus.METHOD_NOT_ALLOWED:
                        headers["Allow"] = ", ".join(exc.body.get("allowed", []))
                    self._drain()
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
            self._send_json(exc.status, exc.body, headers)
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

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_OPTIONS(self) -> None:
        self._route("OPTIONS")

    def do_TRACE(self) -> None:
        self._route("TRACE")

    def do_CONNECT(self) -> None:
        self._route("CONNECT")


class _Listener(socketserver.BaseServer):
    """What the handler reads from its server, whichever socket it came through."""

    api: Api
    token: str
    token_file: Path
    host_policy: auth.HostPolicy | None


class _TcpServer(ThreadingHTTPServer, _Listener):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], tls: ssl.SSLContext | None) -> None:
        self.tls = tls
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The TLS handshake happens here, on the request's own thread, never in accept."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(10.0)
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            wrapped.settimeout(None)
            super().finish_request(wrapped, client_address)
        finally:
            with contextlib.suppress(OSError):
                wrapped.close()


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer, _Listener):
    daemon_threads = True

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = bind_private(path, 64)
        self.path = path

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class Daemon:
    """The API servers and the reconciler thread, started and stopped together."""

    def __init__(self, store: Store, reconciler: Reconciler, config: DaemonConfig | None = None,
                 *, period: float = 1.0) -> None:
        config = config or DaemonConfig()
        config.check()
        self.config = config
        self.store = store
        self.reconciler = reconciler
        self.token = auth.ensure_token(config.token_file)
        uploads = Uploads()
        paths = PathPolicy.of([uploads.root, *config.allow_paths])
        reconciler.paths = paths  # what apply refuses, the reconciler never acts on either
        self.api = Api(store, reconciler, uploads=uploads, paths=paths)
        self.api.registry.sync()  # repair what a crash between index and files left behind
        self.servers: list[_Listener] = []
        try:
            if config.socket is not None:
                self._add(_UnixServer(config.socket), None)
            if config.listen is not None:
                server = _TcpServer(config.listen, self._tls_context())
                self._add(server, auth.HostPolicy.for_listener(config.listen[0],
                                                               config.allow_hosts))
        except BaseException:
            for s in self.servers:
                s.server_close()
            raise
        self._thread = threading.Thread(target=reconciler.run, args=(period,),
                                        name="reconciler", daemon=True)
        self._stopped = threading.Event()

    def _tls_context(self) -> ssl.SSLContext | None:
        if self.config.tls_cert is None or self.config.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise CredentialError(f"cannot load the TLS certificate {self.config.tls_cert} "
                                       f"and key {self.config.tls_key}: {exc}") from None
        return context

    def _add(self, server: _Listener, policy: auth.HostPolicy | None) -> None:
        server.api = self.api
        server.token = self.token
        server.token_file = self.config.token_file
        server.host_policy = policy
        self.servers.append(server)

    @property
    def address(self) -> tuple[str, int]:
        """The TCP address (host, port); only for a daemon with a TCP listener."""
        for server in self.servers:
            if isinstance(server, _TcpServer):
                host, port = server.server_address[:2]
                return str(host), int(port)
        raise ValueError("this daemon has no TCP listener")

    @property
    def urls(self) -> list[str]:
        out = []
        for server in self.servers:
            if isinstance(server, _UnixServer):
                out.append(f"unix://{server.path}")
            else:
                host, port = self.address
                scheme = "https" if isinstance(server, _TcpServer) and server.tls else "http"
                shown = f"[{host}]" if ":" in host else host
                out.append(f"{scheme}://{shown}:{port}")
        return out

    @property
    def url(self) -> str:
        """The TCP URL when there is one (tests and scripts), else the unix socket's."""
        return self.urls[-1]

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`; the replicas keep running after the daemon stops."""
        self._thread.start()
        threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2},
                                    name=f"api-{i}", daemon=True)
                   for i, s in enumerate(self.servers)]
        for t in threads:
            t.start()
        try:
            self._stopped.wait()
        finally:
            for s in self.servers:
                with contextlib.suppress(Exception):
                    s.shutdown()
            for t in threads:
                t.join(timeout=10)
            self.reconciler.stop()
            self._thread.join(timeout=30)
            for s in self.servers:
                s.server_close()

    def shutdown(self) -> None:
        self._stopped.set()
