"""The service endpoint's event loop: one epoll loop relaying HTTP/1.1 to the ready replicas.

Why a loop of our own and not asyncio or a library: the endpoint sits on every
request's path, and its budget is a fraction of the model server's own cost
(≤ 0.3 ms added at p50, ≥ 80 % of a replica's throughput). Like the model
server (:mod:`uniframe.serve.http`) it runs one thread on non-blocking sockets,
but it polls ``select.epoll`` directly rather than through ``selectors``: the
key objects ``selectors`` builds per event are a measurable share of a relay
that does little else. It runs as its own process (see :mod:`.endpoint`) so
the daemon's Python work never holds its GIL.

A request is read whole (its framing only, see :mod:`.framing`), then sent
unchanged on a kept-alive connection to the replica with the fewest requests
in flight (:mod:`.balancer`); the response is relayed byte for byte as it
arrives. The request's bytes are kept until the first response byte is
forwarded, so a replica that dies before answering costs a retry on another
replica, not a failed request: inference is idempotent. A client connection
carries one request at a time; pipelined requests wait in its buffer, which
keeps answers in order without any bookkeeping.

Health is passive and active. A connection that cannot be opened, or a fresh
one that breaks before a response, takes the replica out of rotation at once;
a kept-alive connection that breaks only triggers an immediate check, since
the replica may just have closed an idle connection. Every replica is checked
with ``GET /v2/health/ready`` (every ``check_interval`` seconds, and every
``recheck_interval`` while out), which also catches a replica that drains
(the model server answers 503 there from its SIGTERM on).

With no replica ready a request is held (:mod:`.activator`): up to
``activation_timeout`` seconds, at most ``queue_limit`` of them, while the
daemon, told at once, starts a replica; then released to the first ready one.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniframe.control.proxy import commands, metrics
from uniframe.control.proxy.activator import ACTIVATION_TIMEOUT, Activator
from uniframe.control.proxy.balancer import BackendState, Balancer
from uniframe.control.proxy.framing import (
    ChunkScanner,
    FramingError,
    RequestHead,
    ResponseHead,
    request_head,
    response_head,
)
from uniframe.control.proxy.unixsock import bind_private

IN, OUT = select.EPOLLIN, select.EPOLLOUT
BAD = select.EPOLLERR | select.EPOLLHUP
RECV = 262144
PIPELINE_LIMIT = 4 << 20  # buffered input beyond the request in flight before we stop reading
OUTPUT_LIMIT = 4 << 20  # unsent response bytes before we stop reading the replica
TICK = 0.1  # seconds between timer sweeps (health checks, timeouts)
TICK_HOLDING = 0.02  # ...while the activator holds requests
REASONS = {
    100: b"Continue", 400: b"Bad Request", 413: b"Content Too Large", 431: b"Request Header Fields Too Large",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


@dataclass
class ProxyConfig:
    """Everything the endpoint process is started with; the backends come later, by command."""

    service: str
    host: str = "127.0.0.1"
    port: int = 0
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None  # Prometheus /metrics and JSON /status; None: no admin port
    control_path: str | None = None  # unix socket for JSON commands; None: no control channel
    retries: int = 2  # further replicas tried after the first fails before answering
    activation_timeout: float = ACTIVATION_TIMEOUT  # how long a request is held for a ready
    #                                                 replica; 0: 503 at once
    queue_limit: int = 1024  # requests held at most; one more is answered 503 at once
    retry_after: int = 1  # seconds, in the Retry-After of the endpoint's own 503s
    connect_timeout: float = 2.0
    response_timeout: float = 60.0  # silence from a replica, per request, before 504
    check_interval: float = 2.0
    recheck_interval: float = 0.25
    check_timeout: float = 1.0
    check_path: str = "/v2/health/ready"
    idle_timeout: float = 75.0
    drain_timeout: float = 10.0
    max_header_size: int = 64 << 10
    max_body_size: int = 64 << 20


class Client:
    """A downstream connection and the one request of it that is in flight."""

    __slots__ = ("busy", "close_after", "closed", "exchange", "fd", "head", "head_end", "inbuf", "last",
                 "linger", "outbuf", "paused", "scan_pos", "scanner", "sent_continue", "sock")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.head: RequestHead | None = None
        self.head_end = 0
        self.scanner: ChunkScanner | None = None
        self.scan_pos = 0
        self.sent_continue = False
        self.exchange: Exchange | None = None
        self.close_after = False
        self.linger = False  # write side shut: read and drop until EOF, then close
        self.closed = False
        self.paused = False
        self.busy = False  # inside _process: answers made there must not re-enter it
        self.last = now


class Exchange:
    """One request from the moment it is read until its response is relayed (or given up)."""

    __slots__ = ("backend", "client", "data", "errors", "held", "is_head", "keep_alive", "queued_at",
                 "remaining", "resp", "scanner", "sent", "stale", "tried", "upstream")

    def __init__(self, client: Client, data: bytes, head: RequestHead) -> None:
        self.client: Client | None = client
        self.data = data
        self.is_head = head.is_head
        self.keep_alive = head.keep_alive
        self.backend: BackendState | None = None
        self.upstream: Upstream | None = None
        self.tried: set[str] | None = None
        self.errors: list[str] | None = None
        self.stale: BackendState | None = None  # failed on a reused connection: may be retried fresh
        self.resp: ResponseHead | None = None
        self.scanner: ChunkScanner | None = None
        self.remaining = 0
        self.sent = False  # a response byte went to the client: no retry from here on
        self.queued_at = 0.0
        self.held = False  # waiting in the activator's queue for a ready replica


class Upstream:
    """A connection to a replica: carrying an exchange, or idle in the replica's pool."""

    __slots__ = ("backend", "closed", "connecting", "exchange", "fd", "inbuf", "last", "outbuf", "reused",
                 "sock")

    def __init__(self, sock: socket.socket, backend: BackendState, connecting: bool, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.backend = backend
        self.connecting = connecting
        self.exchange: Exchange | None = None
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.reused = False
        self.closed = False
        self.last = now


class _Check:
    __slots__ = ("backend", "buf", "deadline", "fd", "sent", "sock")

    def __init__(self, sock: socket.socket, backend: BackendState, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.backend = backend
        self.deadline = deadline
        self.buf = b""
        self.sent = False


class _Line:
    """A control or admin connection: small, rare, line or head oriented."""

    __slots__ = ("fd", "inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()


def _reason(exc: OSError | int) -> str:
    code = exc if isinstance(exc, int) else exc.errno
    if code == errno.ECONNREFUSED:
        return "refused the connection"
    if code in (errno.ECONNRESET, errno.EPIPE):
        return "reset the connection"
    if code == errno.ETIMEDOUT:
        return "timed out"
    text = os.strerror(code) if code else str(exc)
    return f"failed: {text}"


class ProxyServer:
    """The endpoint of one service; run :meth:`serve_forever` in its own process (or a thread)."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.service = config.service
        self.balancer = Balancer()
        self.now = time.monotonic()
        self.stopping = False
        self._stop_at = 0.0
        self.codes: dict[int, int] = {}
        self.retries = 0
        self.upstream_errors: dict[str, int] = {}
        self.clients: dict[int, Client] = {}
        self.activator = Activator(self)
        self._checks: dict[int, _Check] = {}
        self._handlers: dict[int, tuple[Callable[[Any, int], None], Any]] = {}
        self._ep = select.epoll()
        self._listener: socket.socket | None = self._listen(config.host, config.port, 1024)
        self.port: int = self._listener.getsockname()[1]
        self._register(self._listener.fileno(), IN, self._on_accept, self._listener)
        self._admin: socket.socket | None = None
        self.admin_port: int | None = None
        if config.admin_port is not None:
            self._admin = self._listen(config.admin_host, config.admin_port, 64)
            self.admin_port = self._admin.getsockname()[1]
            self._register(self._admin.fileno(), IN, self._on_admin_accept, self._admin)
        self._control: socket.socket | None = None
        if config.control_path is not None:
            self._control = self._listen_unix(config.control_path)
            self._register(self._control.fileno(), IN, self._on_control_accept, self._control)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._register(self._wake_r.fileno(), IN, self._on_wake, self._wake_r)

    # -- sockets -------------------------------------------------------------------------

    @staticmethod
    def _listen(host: str, port: int, backlog: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
        sock.listen(backlog)
        sock.setblocking(False)
        return sock

    @staticmethod
    def _listen_unix(path: str) -> socket.socket:
        # 0600 from the moment it exists, in a 0700 directory: the daemon runs as root
        sock = bind_private(Path(path), 16, replace_live=True)
        sock.setblocking(False)
        return sock

    def _register(self, fd: int, mask: int, handler: Callable[[Any, int], None], obj: Any) -> None:
        self._ep.register(fd, mask)
        self._handlers[fd] = (handler, obj)

    def _unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._ep.unregister(fd)

    # -- downstream ----------------------------------------------------------------------

    def _on_accept(self, listener: socket.socket, ev: int) -> None:
        now = self.now
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the connections we have
                print(f"uniframe-proxy: {self.service}: accept failed: {exc}", file=sys.stderr)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Client(sock, now)
            self.clients[c.fd] = c
            self._register(c.fd, IN, self._on_client, c)

    def _on_client(self, c: Client, ev: int) -> None:
        if ev & OUT:
            self._flush_client(c)
        if ev & (IN | BAD) and not c.closed:
            self._read_client(c)

    def _read_client(self, c: Client) -> None:
        try:
            data = c.sock.recv(RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_client(c)
            return
        if not data:
            self._close_client(c)
            return
        c.last = self.now
        if c.close_after:
            return
        if c.exchange is not None or c.outbuf:
            c.inbuf += data
            if len(c.inbuf) > PIPELINE_LIMIT:
                self._pause_client(c)
            return
        if not c.inbuf and c.head is None:
            # The common case: one whole request in one read. Frame it without copying.
            end = data.find(b"\r\n\r\n")
            if 0 <= end <= self.config.max_header_size:
                try:
                    head = request_head(data[:end])
                except FramingError as exc:
                    self._fail_client(c, exc.status, exc.message)
                    return
                if not head.chunked and len(data) == end + 4 + head.length \
                        and head.length <= self.config.max_body_size:
                    self._start(c, head, data)
                    return
        c.inbuf += data
        self._process(c)

    def _process(self, c: Client) -> None:
        """Start every complete request in the buffer, one at a time, while nothing else is in flight."""
        c.busy = True
        try:
            while c.exchange is None and not c.outbuf and not c.close_after and not c.closed:
                buf = c.inbuf
                head = c.head
                cfg = self.config
                if head is None:
                    if not buf:
                        return
                    end = buf.find(b"\r\n\r\n")
                    if end < 0 and len(buf) <= cfg.max_header_size:
                        return
                    if end < 0 or end > cfg.max_header_size:
                        self._fail_client(c, 431, f"request headers exceed {cfg.max_header_size} bytes")
                        return
                    try:
                        head = request_head(bytes(buf[:end]))
                    except FramingError as exc:
                        self._fail_client(c, exc.status, exc.message)
                        return
                    if head.length > cfg.max_body_size:
                        self._fail_client(c, 413, f"request body of {head.length} bytes exceeds the "
                                                  f"limit of {cfg.max_body_size} bytes")
                        return
                    c.head, c.head_end, c.sent_continue = head, end + 4, False
                    if head.chunked:
                        c.scanner, c.scan_pos = ChunkScanner(cfg.max_body_size), end + 4
                if head.chunked:
                    assert c.scanner is not None
                    try:
                        total = c.scanner.feed(buf, c.scan_pos)
                    except FramingError as exc:
                        self._fail_client(c, exc.status, exc.message)
                        return
                    c.scan_pos = len(buf)
                else:
                    total = c.head_end + head.length
                    if len(buf) < total:
                        total = -1
                if total < 0:
                    if head.expect_continue and not c.sent_continue:
                        c.sent_continue = True
                        self._send_client(c, b"HTTP/1.1 100 Continue\r\n\r\n")
                    return
                data = bytes(buf[:total])
                del buf[:total]
                c.head = None
                c.scanner = None
                self._start(c, head, data)
        finally:
            c.busy = False
            if c.paused and len(c.inbuf) <= PIPELINE_LIMIT:
                self._resume_client_reads(c)

    def _start(self, c: Client, head: RequestHead, data: bytes) -> None:
        ex = Exchange(c, data, head)
        c.exchange = ex
        self.dispatch(ex)

    def _send_client(self, c: Client, data: bytes | bytearray) -> None:
        if c.outbuf:
            c.outbuf += data
            return
        try:
            sent = c.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close_client(c)
            return
        if sent < len(data):
            c.outbuf += data[sent:]
            self._ep.modify(c.fd, OUT if c.paused else IN | OUT)

    def _flush_client(self, c: Client) -> None:
        try:
            sent = c.sock.send(c.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_client(c)
            return
        del c.outbuf[:sent]
        ex = c.exchange
        if ex is not None and ex.upstream is not None and len(c.outbuf) < OUTPUT_LIMIT // 2:
            self._resume_upstream_reads(ex.upstream)
        if c.outbuf:
            return
        if c.close_after:
            self._linger(c)
            return
        self._ep.modify(c.fd, 0 if c.paused else IN)
        if c.exchange is None and c.inbuf and not c.busy:
            self._process(c)

    def _pause_client(self, c: Client) -> None:
        if not c.paused:
            c.paused = True
            self._ep.modify(c.fd, OUT if c.outbuf else 0)

    def _resume_client_reads(self, c: Client) -> None:
        if c.paused and not c.closed:
            c.paused = False
            self._ep.modify(c.fd, IN | OUT if c.outbuf else IN)

    def _fail_client(self, c: Client, status: int, message: str) -> None:
        """Answer a request we could not frame, then close: the rest of the stream means nothing."""
        self._count(status)
        self._send_client(c, self._error_response(status, message, keep=False))
        self._finish_client(c)

    def _finish_client(self, c: Client) -> None:
        c.close_after = True
        c.inbuf.clear()
        if not c.outbuf and not c.closed:
            self._linger(c)

    def _linger(self, c: Client) -> None:
        """Shut our side, then drop input until EOF: closing with unread input would reset the answer."""
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_client(c)
            return
        c.linger = True
        c.last = self.now
        self._resume_client_reads(c)
        self._ep.modify(c.fd, IN)

    def _close_client(self, c: Client) -> None:
        if c.closed:
            return
        c.closed = True
        self.clients.pop(c.fd, None)
        self._unregister(c.fd)
        c.sock.close()
        ex = c.exchange
        if ex is not None:
            c.exchange = None
            ex.client = None
            self.activator.forget(ex)
            up = ex.upstream
            if up is not None:  # the answer would have nowhere to go: this connection cannot be reused
                self._release(ex, up, reuse=False)

    def _resume(self, c: Client | None) -> None:
        if c is not None and not c.closed and not c.busy and c.exchange is None and c.inbuf \
                and not c.outbuf:
            self._process(c)

    # -- choosing and reaching a replica ---------------------------------------------------

    def dispatch(self, ex: Exchange) -> None:
        """Send ``ex`` to the replica the balancer picks; none eligible: the activator holds it."""
        b = self.balancer.pick(ex.tried) if ex.tried else self.balancer.pick()
        fresh = False
        if b is None:
            stale = ex.stale
            if stale is not None and stale.eligible:
                b, fresh, ex.stale = stale, True, None
            elif ex.errors:
                self._give_up(ex)
                return
            else:
                self.activator.hold(ex)
                return
        up: Upstream | None = None
        if not fresh and b.idle:
            up = b.idle.pop()
            up.reused = True
        if up is None:
            try:
                up = self._connect(b)
            except OSError as exc:
                self._attempt_failed(ex, b, _reason(exc), reused=False, kind="connect")
                return
        b.outstanding += 1
        ex.backend = b
        ex.upstream = up
        up.exchange = ex
        up.last = self.now
        if not up.connecting:
            self._send_upstream(up, ex.data)

    def _connect(self, b: BackendState) -> Upstream:
        sock = socket.socket(b.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(b.addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(err, os.strerror(err))
        up = Upstream(sock, b, err != 0, self.now)
        self._register(up.fd, OUT if up.connecting else IN, self._on_upstream, up)
        return up

    def _on_upstream(self, up: Upstream, ev: int) -> None:
        if up.connecting:
            if not ev & (OUT | BAD):
                return
            err = up.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._upstream_failed(up, _reason(err), "connect")
                return
            try:
                up.sock.getpeername()
            except OSError:
                return  # a stale event for a reused descriptor: still connecting
            up.connecting = False
            self._ep.modify(up.fd, IN)
            if up.exchange is not None:
                self._send_upstream(up, up.exchange.data)
            return
        if ev & OUT and up.outbuf:
            self._flush_upstream(up)
        if ev & (IN | BAD) and not up.closed:
            self._read_upstream(up)

    def _send_upstream(self, up: Upstream, data: bytes) -> None:
        try:
            sent = up.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._upstream_failed(up, _reason(exc), "reset")
            return
        if sent < len(data):
            up.outbuf += data[sent:]
            self._ep.modify(up.fd, IN | OUT)

    def _flush_upstream(self, up: Upstream) -> None:
        try:
            sent = up.sock.send(up.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._upstream_failed(up, _reason(exc), "reset")
            return
        del up.outbuf[:sent]
        if not up.outbuf:
            self._ep.modify(up.fd, IN)

    def _read_upstream(self, up: Upstream) -> None:
        try:
            data = up.sock.recv(RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._upstream_failed(up, _reason(exc), "reset")
            return
        ex = up.exchange
        if ex is None:  # an idle pooled connection closed (or spoke out of turn): drop it
            self._close_upstream(up)
            return
        if not data:
            resp = ex.resp
            if resp is not None and resp.until_close:
                self._release(ex, up, reuse=False)
                return
            if ex.sent:
                self._upstream_failed(up, "closed the connection in the middle of a response", "eof")
            else:
                self._upstream_failed(up, "closed the connection before answering", "eof")
            return
        up.last = self.now
        if ex.resp is None:
            buf: bytes | bytearray = data
            if up.inbuf:
                up.inbuf += data
                buf = up.inbuf
            start = 0
            while True:  # skip interim (1xx) responses: our own 100 went out already, if any
                end = buf.find(b"\r\n\r\n", start)
                if end < 0:
                    if len(buf) - start > self.config.max_header_size:
                        self._bad_upstream(ex, up, "sent response headers larger than "
                                                   f"{self.config.max_header_size} bytes")
                        return
                    if buf is not up.inbuf or start:
                        up.inbuf = bytearray(buf[start:])
                    return
                try:
                    resp = response_head(bytes(buf[start:end]), ex.is_head)
                except FramingError as exc:
                    self._bad_upstream(ex, up, exc.message)
                    return
                if resp.status >= 200 or resp.status == 101:
                    break
                start = end + 4
            if resp.status == 101:
                self._bad_upstream(ex, up, "switched protocols, which this endpoint does not relay")
                return
            up.inbuf = bytearray()
            if start:
                buf = buf[start:]
                end -= start
            ex.resp = resp
            body = end + 4
            if resp.chunked:
                ex.scanner = ChunkScanner()
                stop = self._scan(ex, up, buf, body)
                if stop == -2:
                    return
            elif resp.until_close:
                stop = -1
            elif len(buf) - body >= resp.length:
                stop = body + resp.length
            else:
                ex.remaining = resp.length - (len(buf) - body)
                stop = -1
        else:
            buf = data
            resp = ex.resp
            if resp.chunked:
                stop = self._scan(ex, up, buf, 0)
                if stop == -2:
                    return
            elif resp.until_close:
                stop = -1
            elif len(buf) >= ex.remaining:
                stop = ex.remaining
            else:
                ex.remaining -= len(buf)
                stop = -1
        c = ex.client
        assert c is not None
        ex.sent = True
        if stop < 0:
            self._send_client(c, buf)
            if len(c.outbuf) > OUTPUT_LIMIT and not up.closed:
                self._ep.modify(up.fd, 0)  # the client reads slower than the replica writes: wait
            return
        self._send_client(c, buf if stop == len(buf) else buf[:stop])
        if c.closed:  # the client went away; closing it released the exchange already
            return
        reuse = resp.keep_alive and ex.keep_alive and stop == len(buf) and not up.outbuf
        self._release(ex, up, reuse=reuse)

    def _scan(self, ex: Exchange, up: Upstream, buf: bytes | bytearray, start: int) -> int:
        assert ex.scanner is not None
        try:
            return ex.scanner.feed(buf, start)
        except FramingError as exc:
            self._bad_upstream(ex, up, f"sent a malformed chunked body: {exc.message}")
            return -2

    def _resume_upstream_reads(self, up: Upstream) -> None:
        if not up.closed and not up.connecting:
            self._ep.modify(up.fd, IN | OUT if up.outbuf else IN)

    def _release(self, ex: Exchange, up: Upstream, *, reuse: bool) -> None:
        """The exchange is over on this connection: account for it and pool or close the connection."""
        b = up.backend
        b.outstanding -= 1
        up.exchange = None
        ex.upstream = None
        c = ex.client
        resp = ex.resp
        if c is not None and resp is not None and ex.sent:
            b.requests += 1
            self._count(resp.status)
        if reuse and not b.removed and not b.draining and b.healthy:
            b.idle.append(up)
        else:
            self._close_upstream(up)
        if c is None:
            return
        c.exchange = None
        ex.client = None
        if not ex.keep_alive or resp is None or not resp.keep_alive or self.stopping:
            self._finish_client(c)
        else:
            self._resume(c)

    def _close_upstream(self, up: Upstream) -> None:
        if up.closed:
            return
        up.closed = True
        self._unregister(up.fd)
        up.sock.close()
        idle = up.backend.idle
        if up in idle:
            idle.remove(up)

    def _upstream_failed(self, up: Upstream, reason: str, kind: str) -> None:
        ex = up.exchange
        self._close_upstream(up)
        if ex is None:
            return
        b = up.backend
        b.outstanding -= 1
        up.exchange = None
        ex.upstream = None
        if ex.sent:  # part of an answer is out: nothing to retry, the client must see the break
            self._note_failure(b, reason, kind)
            print(f"uniframe-proxy: {self.service}: replica {b.id} {reason}; response cut",
                  file=sys.stderr)
            if ex.client is not None:
                self._close_client(ex.client)
            return
        self._attempt_failed(ex, b, reason, reused=up.reused, kind=kind)

    def _note_failure(self, b: BackendState, reason: str, kind: str) -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1
        b.failures += 1
        b.last_error = reason

    def _attempt_failed(self, ex: Exchange, b: BackendState, reason: str, *, reused: bool, kind: str) -> None:
        self._note_failure(b, reason, kind)
        if reused:
            b.next_check = 0.0  # it may only have closed an idle connection: look now
        else:
            self._set_health(b, False, reason)
        if ex.client is None:
            return
        errors = ex.errors
        if errors is None:
            errors = ex.errors = []
        errors.append(f"replica {b.id} ({b.host}:{b.port}) {reason}")
        if len(errors) > self.config.retries:
            self._give_up(ex)
            return
        self.retries += 1
        if ex.tried is None:
            ex.tried = set()
        ex.tried.add(b.id)
        if reused:
            ex.stale = b
        self.dispatch(ex)

    def _bad_upstream(self, ex: Exchange, up: Upstream, reason: str) -> None:
        """A replica answered something that is not HTTP we can relay: 502, and no retry."""
        b = up.backend
        self._note_failure(b, reason, "protocol")
        self._close_upstream(up)
        b.outstanding -= 1
        up.exchange = None
        ex.upstream = None
        c = ex.client
        if c is None:
            return
        if ex.sent:
            self._close_client(c)
            return
        self.reply(ex, 502, f"service {self.service}: replica {b.id} {reason}")

    def _give_up(self, ex: Exchange) -> None:
        tried = "; ".join(ex.errors or [])
        self.reply(ex, 502, f"service {self.service}: no replica answered ({tried})")

    def reply(self, ex: Exchange, status: int, message: str, *, extra: dict[str, str] | None = None,
              headers: bytes = b"") -> None:
        """The proxy's own answer to a request it could not relay; the connection stays usable.

        The body is ``{"error": message}`` plus ``extra``; ``headers`` are raw header lines.
        """
        c = ex.client
        if c is None:
            return
        c.exchange = None
        ex.client = None
        self._count(status)
        keep = ex.keep_alive and not self.stopping
        self._send_client(c, self._error_response(status, message, keep=keep, head=ex.is_head,
                                                  extra=extra, headers=headers))
        if not keep:
            self._finish_client(c)
        else:
            self._resume(c)

    def _error_response(self, status: int, message: str, *, keep: bool, head: bool = False,
                        extra: dict[str, str] | None = None, headers: bytes = b"") -> bytes:
        body = json.dumps({"error": message, **(extra or {})}).encode()
        return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
            status, REASONS.get(status, b"Error"), len(body), headers,
            b"" if keep else b"Connection: close\r\n", b"" if head else body,
        )

    def _count(self, status: int) -> None:
        self.codes[status] = self.codes.get(status, 0) + 1

    # -- health ----------------------------------------------------------------------------

    def _set_health(self, b: BackendState, healthy: bool, reason: str) -> None:
        if b.healthy == healthy:
            return
        b.healthy = healthy
        b.next_check = self.now + (self.config.check_interval if healthy else self.config.recheck_interval)
        if healthy:
            print(f"uniframe-proxy: {self.service}: replica {b.id} is back in rotation", file=sys.stderr)
        else:
            b.last_error = reason
            print(f"uniframe-proxy: {self.service}: replica {b.id} {reason}; out of rotation",
                  file=sys.stderr)
            self.close_idle(b)
        self.balancer.rebuild()
        if healthy:
            self.activator.release()

    def reported_ready(self, b: BackendState) -> None:
        """The reconciler reports ``b`` ready, having just probed it itself.

        Checks that failed while the replica was still starting (connection
        refused) must not keep it out of rotation until the next recheck: a
        canary the rollout already calls ready would meanwhile get none of its
        share. So it is trusted, as a new backend is, and checked again at
        once; a failure then takes it out as usual.
        """
        if not b.healthy:
            b.healthy = True
            print(f"uniframe-proxy: {self.service}: replica {b.id} reported ready; back in rotation",
                  file=sys.stderr)
        b.next_check = self.now

    def _start_check(self, b: BackendState) -> None:
        b.checking = True
        sock = socket.socket(b.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(b.addr)
        chk = _Check(sock, b, self.now + self.config.check_timeout)
        if err not in (0, errno.EINPROGRESS):
            self._check_done(chk, False, _reason(err))
            return
        self._checks[chk.fd] = chk
        self._register(chk.fd, OUT, self._on_check, chk)

    def _on_check(self, chk: _Check, ev: int) -> None:
        if not chk.sent:
            err = chk.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._check_done(chk, False, _reason(err))
                return
            request = (f"GET {self.config.check_path} HTTP/1.1\r\nHost: {chk.backend.host}\r\n"
                       "Connection: close\r\n\r\n").encode()
            try:
                chk.sock.send(request)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._check_done(chk, False, _reason(exc))
                return
            chk.sent = True
            self._ep.modify(chk.fd, IN)
            return
        try:
            data = chk.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._check_done(chk, False, _reason(exc))
            return
        chk.buf += data
        if b"\r\n" in chk.buf:
            status = chk.buf[9:12]
            path = self.config.check_path
            self._check_done(chk, status == b"200", f"answered {status.decode('latin-1')} on {path}")
        elif not data:
            self._check_done(chk, False, "closed the connection on the health check")

    def _check_done(self, chk: _Check, ok: bool, reason: str) -> None:
        self._checks.pop(chk.fd, None)
        self._unregister(chk.fd)
        chk.sock.close()
        b = chk.backend
        b.checking = False
        cfg = self.config
        b.next_check = self.now + (cfg.check_interval if ok else cfg.recheck_interval)
        if not b.removed:
            self._set_health(b, ok, f"{reason} (health check)")
            if not b.ready:
                self.activator.checked_starting(b, ok)

    # -- timers ----------------------------------------------------------------------------

    def _sweep(self) -> None:
        now = self.now
        cfg = self.config
        for b in list(self.balancer.backends.values()):
            if not b.checking and now >= b.next_check:
                self._start_check(b)
        for chk in list(self._checks.values()):
            if now > chk.deadline:
                self._check_done(chk, False, f"did not answer {cfg.check_path} within {cfg.check_timeout:g} s")
        self.activator.sweep(now)
        for c in list(self.clients.values()):
            ex = c.exchange
            if ex is None:
                idle = now - c.last
                if (c.linger and idle > 2.0) or idle > cfg.idle_timeout or (
                        self.stopping and not c.outbuf and not c.inbuf):
                    self._close_client(c)
                continue
            up = ex.upstream
            if up is None:
                continue
            if up.connecting and now - up.last > cfg.connect_timeout:
                self._upstream_failed(up, f"did not accept a connection within {cfg.connect_timeout:g} s",
                                      "connect")
            elif not up.connecting and now - up.last > cfg.response_timeout:
                b = up.backend
                self._note_failure(b, f"did not answer within {cfg.response_timeout:g} s", "timeout")
                self._close_upstream(up)
                b.outstanding -= 1
                up.exchange = None
                ex.upstream = None
                if ex.sent:
                    self._close_client(c)
                else:
                    self.reply(ex, 504, f"service {self.service}: replica {b.id} did not answer "
                                         f"within {cfg.response_timeout:g} s")

    # -- the control channel ---------------------------------------------------------------

    def apply(self, command: dict[str, Any]) -> dict[str, Any]:
        """Carry out one control command (see :mod:`.commands`)."""
        return commands.apply(self, command)

    def backends_changed(self) -> None:
        """Membership, readiness or weights changed: recompute the rotation, serve who waited."""
        self.balancer.rebuild()
        self.activator.release()

    def close_idle(self, b: BackendState) -> None:
        """Close the replica's pooled connections; those carrying a request close when it is done."""
        for up in list(b.idle):
            self._close_upstream(up)

    def status(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "host": self.config.host,
            "port": self.port,
            "admin_port": self.admin_port,
            "requests": sum(self.codes.values()),
            "codes": {str(k): v for k, v in sorted(self.codes.items())},
            "retries": self.retries,
            "upstream_errors": sum(self.upstream_errors.values()),
            "held": self.activator.held,
            "in_flight": sum(b.outstanding for b in self.balancer.backends.values()),
            "demands": self.activator.demands,
            "activation_timeout": self.config.activation_timeout,
            "queue_limit": self.config.queue_limit,
            "clients": len(self.clients),
            "weights": dict(self.balancer.weights),
            "backends": [b.describe() for b in self.balancer.backends.values()],
        }

    def render_metrics(self) -> bytes:
        return metrics.render(self.service, self.codes, self.retries, self.upstream_errors,
                              self.activator.held, self.activator.demands, len(self.clients),
                              self.balancer.backends.values())

    def _accept_line(self, listener: socket.socket, handler: Callable[[_Line, int], None]) -> None:
        """A new connection on the control socket or the admin port, read by ``handler``."""
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        line = _Line(sock)
        self._register(line.fd, IN, handler, line)

    def _on_control_accept(self, listener: socket.socket, ev: int) -> None:
        self._accept_line(listener, self._on_control)

    def _on_control(self, conn: _Line, ev: int) -> None:
        if ev & OUT:
            self.flush_line(conn)
        if not ev & (IN | BAD):
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close_line(conn)
            return
        conn.inbuf += data
        while (nl := conn.inbuf.find(b"\n")) >= 0:
            raw = bytes(conn.inbuf[:nl])
            del conn.inbuf[: nl + 1]
            try:
                command = json.loads(raw)
                if not isinstance(command, dict):
                    raise ValueError("a command is a JSON object")
                if command.get("op") == "subscribe":  # from here on a stream of event lines
                    conn.outbuf += b'{"ok": true}\n'
                    self.activator.subscribe(conn)
                    continue
                reply = self.apply(command)
            except ValueError as exc:
                reply = {"ok": False, "error": f"malformed command: {exc}"}
            conn.outbuf += json.dumps(reply).encode() + b"\n"
        self.flush_line(conn)

    def flush_line(self, conn: _Line) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close_line(conn)
            return
        del conn.outbuf[:sent]
        self._ep.modify(conn.fd, IN | OUT if conn.outbuf else IN)

    def close_line(self, conn: _Line) -> None:
        self.activator.unsubscribe(conn)
        self._unregister(conn.fd)
        conn.sock.close()

    # -- the admin port: /metrics and /status --------------------------------------------------

    def _on_admin_accept(self, listener: socket.socket, ev: int) -> None:
        self._accept_line(listener, self._on_admin)

    def _on_admin(self, conn: _Line, ev: int) -> None:
        if ev & OUT:
            self._flush_admin(conn)
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close_line(conn)
            return
        conn.inbuf += data
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbuf) > 65536:
                self.close_line(conn)
            return
        parts = bytes(conn.inbuf[: conn.inbuf.find(b"\r\n")]).split(b" ")
        path = parts[1].split(b"?", 1)[0] if len(parts) == 3 else b""
        if path == b"/metrics":
            status, ctype, body = 200, b"text/plain; version=0.0.4; charset=utf-8", self.render_metrics()
        elif path == b"/status":
            status, ctype, body = 200, b"application/json", json.dumps(self.status()).encode()
        else:
            status, ctype = 404, b"application/json"
            body = json.dumps({"error": f"no route for {path.decode('latin-1')!r}; "
                                        "this admin port serves /metrics and /status"}).encode()
        conn.outbuf += b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
            status, b"OK" if status == 200 else b"Not Found", ctype, len(body), body)
        self._ep.modify(conn.fd, OUT)
        self._flush_admin(conn)

    def _flush_admin(self, conn: _Line) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close_line(conn)
            return
        del conn.outbuf[:sent]
        if not conn.outbuf:
            self.close_line(conn)

    # -- lifecycle -------------------------------------------------------------------------

    def _on_wake(self, sock: socket.socket, ev: int) -> None:
        try:
            while sock.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def shutdown(self) -> None:
        """Stop accepting, finish the requests in flight (up to ``drain_timeout``), then return."""
        if not self.stopping:
            self.stopping = True
            self._stop_at = time.monotonic() + self.config.drain_timeout
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.shutdown())

    def serve_forever(self, on_ready: Callable[[ProxyServer], None] | None = None) -> None:
        self._install_signals()
        # The relay allocates small objects per request and keeps few: a young-generation
        # collection every 700 allocations is pure overhead on the request path.
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        if on_ready is not None:
            on_ready(self)
        poll = self._ep.poll
        handlers = self._handlers
        activator = self.activator
        last_sweep = 0.0
        try:
            while True:
                # timers every 0.1 s; every 20 ms while requests are held, so a starting
                # replica is checked (and the daemon woken) soon after it answers
                tick = TICK_HOLDING if activator.held else TICK
                for fd, ev in poll(tick):
                    h = handlers.get(fd)
                    if h is not None:
                        h[0](h[1], ev)
                now = self.now = time.monotonic()
                if now - last_sweep >= tick:
                    last_sweep = now
                    if self.stopping and self._stopped(now):
                        return
                    self._sweep()
        finally:
            self._close_all()

    def _stopped(self, now: float) -> bool:
        if self._listener is not None:
            self._unregister(self._listener.fileno())
            self._listener.close()
            self._listener = None
            self.activator.stop()
        busy = any(c.exchange is not None or c.outbuf for c in self.clients.values())
        return not busy or now > self._stop_at

    def _close_all(self) -> None:
        for c in list(self.clients.values()):
            self._close_client(c)
        for b in self.balancer.backends.values():
            self.close_idle(b)
        for fd, (_, obj) in list(self._handlers.items()):
            self._unregister(fd)
            if isinstance(obj, (socket.socket, _Line, _Check, Upstream)):
                sock = obj if isinstance(obj, socket.socket) else obj.sock
                sock.close()
        if self.config.control_path and os.path.exists(self.config.control_path):
            os.unlink(self.config.control_path)
        self._ep.close()
        self._wake_w.close()

