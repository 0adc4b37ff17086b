"""A single-threaded HTTP/1.1 server on epoll, made for one job: OIP v2 requests.

Why not asyncio or a framework: everything here is packed into unikernel
images and sits on every request's path. One ``selectors`` loop with
non-blocking sockets keeps the import closure to the standard library, and
costs a fraction of a coroutine-per-request design. Inference runs inline on
the loop: a replica is one core's worth of work, and the platform scales by
replicas.

Supported: keep-alive and pipelining, ``Content-Length`` and chunked bodies,
``Expect: 100-continue``, gzip/deflate request bodies, limits on header and
body size (431, 413), idle connection timeouts, and a graceful drain on
SIGTERM (stop accepting, answer ``/v2/health/ready`` with 503, finish what
was received, then exit).

Large requests (``memory.LARGE`` and up) take a path of their own, because a
replica's memory is fixed (:mod:`uniframe.serve.memory`): the body is received
straight into one buffer of its announced size (no growing buffer, no copy to
hand it over), the answer is written with ``sendmsg`` from its pieces (no
concatenation, no copy of what the socket did not take), and once the answer is
out the freed heap goes back to the system (``malloc_trim``), so a replica that
served one big request does not keep its peak. Small requests never touch any of
it.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import orjson

from uniframe.serve import __version__, codec
from uniframe.serve.errors import (
    BadRequest,
    HeadersTooLarge,
    MethodNotAllowed,
    NotFound,
    ServeError,
    TooLarge,
)
from uniframe.serve.memory import JSON_COST_FACTOR, LARGE
from uniframe.serve.metrics import Metrics
from uniframe.serve.model import OnnxModel

REASONS = {
    100: b"Continue", 200: b"OK", 400: b"Bad Request", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 411: b"Length Required",
    413: b"Content Too Large", 415: b"Unsupported Media Type",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    503: b"Service Unavailable", 505: b"HTTP Version Not Supported",
}
JSON = b"application/json"
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?/?$")
_CHUNK_END = b"\r\n0\r\n"

Payload = bytes | list[bytes | memoryview]  # one piece, or pieces written as they are
Response = tuple[int, Payload, bytes, bytes]  # status, body, content type, extra header lines
_IOV_MAX = 64  # pieces per sendmsg; the kernel's limit is 1024


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on a libc without it (musl) or without ctypes."""
    try:
        fn: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return fn


_malloc_trim = _load_malloc_trim()


def give_back_memory() -> None:
    """Return the heap freed by a large request to the system.

    glibc keeps freed memory for reuse: blocks under its mmap threshold (which it
    raises to the largest block freed, up to 32 MiB) stay in the heap, so without
    this a replica would stay at a large request's peak. Costs a walk of the heap,
    so it runs only after large requests.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


class _Conn:
    __slots__ = ("addr", "body", "close_after", "discard", "got", "head", "inbuf", "last",
                 "outbuf", "outq", "sent_continue", "sock", "trim")

    def __init__(self, sock: socket.socket, addr: Any) -> None:
        self.sock = sock
        self.addr = addr
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.outq: deque[memoryview] | None = None  # a large answer's unsent pieces
        self.body: bytearray | None = None  # a large body being received in place
        self.got = 0  # bytes of ``body`` received
        self.head: _Head | None = None
        self.last = time.monotonic()
        self.close_after = False
        self.discard = False  # write side shut: read and drop until EOF, then close
        self.sent_continue = False
        self.trim = False  # give memory back once the pending answer is out


class _Head:
    """The parsed request line and headers of the request being received."""

    __slots__ = ("chunked", "headers", "keep_alive", "length", "method", "start", "target")

    def __init__(self, method: bytes, target: bytes, headers: dict[bytes, bytes], keep_alive: bool,
                 length: int, chunked: bool) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.keep_alive = keep_alive
        self.length = length
        self.chunked = chunked
        self.start = time.perf_counter()


def _error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


class Server:
    """Serve ``models`` over OIP v2 on ``host:port`` until SIGTERM or :meth:`shutdown`."""

    def __init__(
        self,
        models: list[OnnxModel],
        host: str = "0.0.0.0",
        port: int = 8080,
        *,
        max_body_size: int = 64 << 20,
        max_header_size: int = 64 << 10,
        idle_timeout: float = 75.0,
        drain_timeout: float = 10.0,
        access_log: bool = False,
    ) -> None:
        self.models: dict[str, dict[str, OnnxModel]] = {}
        for m in models:
            self.models.setdefault(m.name, {})[m.version] = m
        self.max_body_size = max_body_size
        self.max_header_size = max_header_size
        self.idle_timeout = idle_timeout
        self.drain_timeout = drain_timeout
        self.access_log = access_log
        self.metrics = Metrics()
        self.draining = False
        self._stop_at: float | None = None
        self._conns: dict[int, _Conn] = {}
        self._routes = self._build_routes()
        self._sel = selectors.DefaultSelector()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener: socket.socket | None = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as exc:
            self._listener.close()
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self._listener.listen(1024)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    # -- routing ---------------------------------------------------------------------------

    def _build_routes(self) -> dict[bytes, tuple[str, OnnxModel | None]]:
        routes: dict[bytes, tuple[str, OnnxModel | None]] = {
            b"/v2/health/live": ("live", None),
            b"/v2/health/ready": ("ready", None),
            b"/v2": ("server", None),
            b"/v2/": ("server", None),
            b"/metrics": ("metrics", None),
        }
        for name, versions in self.models.items():
            latest = versions[max(versions, key=_version_key)]
            prefixes = [(f"/v2/models/{name}", latest)]
            prefixes += [(f"/v2/models/{name}/versions/{v}", m) for v, m in versions.items()]
            for prefix, model in prefixes:
                routes[prefix.encode()] = ("model", model)
                routes[f"{prefix}/ready".encode()] = ("model_ready", model)
                routes[f"{prefix}/infer".encode()] = ("infer", model)
        return routes

    def _route(self, path: bytes) -> tuple[str, OnnxModel | None]:
        hit = self._routes.get(path)
        if hit is not None:
            return hit
        text = unquote(path.decode("latin-1"))
        hit = self._routes.get(text.encode())
        if hit is not None:
            return hit
        m = _MODEL_PATH.match(text)
        if m is None:
            raise NotFound(f"no route for {text!r}; the API is under /v2 (see GET /v2)")
        name, version = m.group(1), m.group(2)
        versions = self.models.get(name)
        if versions is None:
            served = ", ".join(repr(n) for n in sorted(self.models)) or "none"
            raise NotFound(f"unknown model {name!r}; this server serves {served}")
        if version not in versions:
            raise NotFound(
                f"model {name!r} has no version {version!r}; versions: "
                + ", ".join(sorted(versions, key=_version_key))
            )
        raise NotFound(f"no route for {text!r}")  # pragma: no cover - exact routes cover the rest

    def _handle(self, head: _Head, body: bytes | bytearray) -> Response:
        path = head.target.split(b"?", 1)[0]
        kind, model = self._route(path)
        method = head.method
        if kind == "infer":
            if method != b"POST":
                raise MethodNotAllowed(f"{path.decode()} takes POST, not {method.decode()}")
            assert model is not None
            return self._infer(model, head, body)
        if method not in (b"GET", b"HEAD"):
            raise MethodNotAllowed(f"{path.decode()} takes GET, not {method.decode()}")
        if kind == "live":
            return 200, b'{"live":true}', JSON, b""
        if kind == "ready":
            if self.draining:
                return 503, b'{"ready":false}', JSON, b""
            return 200, b'{"ready":true}', JSON, b""
        if kind == "server":
            meta = {"name": "uniframe", "version": __version__,
                    "extensions": ["binary_tensor_data", "metrics"]}
            return 200, orjson.dumps(meta), JSON, b""
        if kind == "metrics":
            return 200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8", b""
        assert model is not None
        if kind == "model_ready":
            ready = not self.draining
            return (200 if ready else 503), orjson.dumps({"name": model.name, "ready": ready}), JSON, b""
        return 200, orjson.dumps(model.metadata()), JSON, b""

    def _infer(self, model: OnnxModel, head: _Head, body: bytes | bytearray) -> Response:
        raw_len = head.headers.get(b"inference-header-content-length")
        header_length: int | None = None
        if raw_len is not None:
            try:
                header_length = int(raw_len)
                if header_length < 0:
                    raise ValueError
            except ValueError:
                raise BadRequest(
                    f"Inference-Header-Content-Length must be a non-negative integer, got {raw_len!r}"
                ) from None
        request = codec.decode(model, body, header_length,
                               max_json_cost=JSON_COST_FACTOR * self.max_body_size)
        feeds, request.feeds = request.feeds, {}
        results = model.run(feeds, request.outputs)
        del feeds
        if isinstance(body, bytearray):  # our own buffer: its tensors are gone, so is its use
            with contextlib.suppress(BufferError):
                body.clear()
        head_json, chunks = codec.encode_parts(model, request, results)
        del results
        if not chunks:
            return 200, head_json, JSON, b""
        return (200, [head_json, *chunks], b"application/octet-stream",
                b"Inference-Header-Content-Length: %d\r\n" % len(head_json))

    # -- connection handling ---------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, addr = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE and friends: keep serving the connections we have
                print(f"uniframe-serve: accept failed: {exc}", file=sys.stderr)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, addr)
            self._conns[sock.fileno()] = conn
            self.metrics.connections += 1
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd < 0 or self._conns.pop(fd, None) is None:
            return
        if conn.head is not None:
            self.metrics.inflight -= 1
            conn.head = None
        self.metrics.connections -= 1
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()
        conn.body = conn.outq = None
        if conn.trim:
            conn.trim = False
            give_back_memory()

    def _read(self, conn: _Conn) -> None:
        if conn.body is not None:
            self._read_body(conn)
            return
        try:
            data = conn.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.last = time.monotonic()
        if conn.discard:
            return
        conn.inbuf += data
        self._process(conn)

    def _read_body(self, conn: _Conn) -> None:
        """Receive more of a large body straight into its buffer, never past its end."""
        assert conn.body is not None
        with memoryview(conn.body) as view:
            try:
                n = conn.sock.recv_into(view[conn.got:])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = 0
        if not n:
            self._close(conn)
            return
        conn.last = time.monotonic()
        conn.got += n
        if conn.got == len(conn.body):
            self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Answer every complete request in the buffer, in order, while output is not backed up."""
        while not conn.outbuf and conn.outq is None and not conn.close_after:
            buf = conn.inbuf
            head = conn.head
            if head is None:
                if not buf:
                    return
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > self.max_header_size:
                        self._fail(conn, HeadersTooLarge(
                            f"request headers exceed {self.max_header_size} bytes"), close=True)
                    return
                if end > self.max_header_size:
                    self._fail(conn, HeadersTooLarge(
                        f"request headers exceed {self.max_header_size} bytes"), close=True)
                    return
                try:
                    head = self._parse_head(bytes(buf[:end]))
                except ServeError as exc:
                    self._fail(conn, exc, close=True)
                    return
                del buf[: end + 4]
                conn.head = head
                conn.sent_continue = False
                self.metrics.inflight += 1
                if head.length > self.max_body_size:
                    self._fail(conn, TooLarge(
                        f"request body of {head.length} bytes exceeds the limit of "
                        f"{self.max_body_size} bytes (--max-body-size)"), close=True)
                    return
                if head.length >= LARGE and not head.chunked:
                    self._receive_in_place(conn, head.length)
            try:
                body = self._take_body(conn, head)
            except ServeError as exc:
                self._fail(conn, exc, close=True)
                return
            if body is None:
                if not conn.sent_continue and head.headers.get(b"expect", b"").lower() == b"100-continue":
                    conn.sent_continue = True
                    self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            conn.head = None
            large = len(body) >= LARGE
            self._dispatch(conn, head, body)
            self.metrics.inflight -= 1
            if large:
                del body
                self._after_large(conn)

    def _receive_in_place(self, conn: _Conn, length: int) -> None:
        """Receive a large body into one buffer of its size; what already arrived moves first."""
        body = bytearray(length)
        buf = conn.inbuf
        n = min(len(buf), length)
        body[:n] = buf[:n]
        del buf[:n]
        conn.body, conn.got = body, n

    def _after_large(self, conn: _Conn) -> None:
        """Give memory back after a large request: now, or once its answer is written."""
        if conn.outq is not None or conn.outbuf:
            conn.trim = True
        else:
            give_back_memory()

    def _parse_head(self, raw: bytes) -> _Head:
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise BadRequest(f"malformed request line {lines[0][:200]!r}")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            err = ServeError(f"unsupported protocol version {version[:20]!r}")
            err.status, err.kind = 505, "bad_request"
            raise err
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            key, sep, value = line.partition(b":")
            if not sep or not key or key[-1:] in b" \t":
                raise BadRequest(f"malformed header line {line[:200]!r}")
            headers[key.lower()] = value.strip()
        connection = headers.get(b"connection", b"").lower()
        if version == b"HTTP/1.1":
            keep_alive = b"close" not in connection
        else:
            keep_alive = b"keep-alive" in connection
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        length = 0
        if not chunked:
            raw_len = headers.get(b"content-length")
            if raw_len is not None:
                try:
                    length = int(raw_len)
                    if length < 0:
                        raise ValueError
                except ValueError:
                    raise BadRequest(f"Content-Length {raw_len[:40]!r} is not a number") from None
        return _Head(method, target, headers, keep_alive, length, chunked)

    def _take_body(self, conn: _Conn, head: _Head) -> bytes | bytearray | None:
        buf = conn.inbuf
        body: bytes | bytearray
        if conn.body is not None:
            if conn.got < len(conn.body):
                return None
            body, conn.body = conn.body, None
        elif head.chunked:
            if not (buf.startswith(b"0\r\n") or _CHUNK_END in buf):
                if len(buf) > self.max_body_size + 65536:
                    raise TooLarge(f"chunked request body exceeds {self.max_body_size} bytes")
                return None
            decoded = self._dechunk(buf)
            if decoded is None:
                return None
            body, used = decoded
            del buf[:used]
        else:
            if len(buf) < head.length:
                return None
            body = bytes(buf[: head.length])
            del buf[: head.length]
        encoding = head.headers.get(b"content-encoding", b"identity").lower()
        if encoding not in (b"identity", b""):
            body = self._decompress(body, encoding)
        return body

    def _dechunk(self, buf: bytearray) -> tuple[bytearray, int] | None:
        parts: list[tuple[int, int]] = []  # (start, size): copied once, when the body is complete
        pos = total = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequest(f"malformed chunk size {size_text[:20]!r}") from None
            pos = eol + 2
            if size == 0:
                end = buf.find(b"\r\n\r\n", pos - 2)  # skip trailers, if any
                if end < 0:
                    return None
                body = bytearray(total)
                at = 0
                with memoryview(buf) as view:
                    for start, size in parts:
                        body[at : at + size] = view[start : start + size]
                        at += size
                return body, end + 4
            total += size
            if total > self.max_body_size:
                raise TooLarge(f"chunked request body exceeds {self.max_body_size} bytes")
            if len(buf) < pos + size + 2:
                return None
            parts.append((pos, size))
            pos += size + 2

    def _decompress(self, body: bytes | bytearray, encoding: bytes) -> bytes:
        wbits = {b"gzip": 31, b"x-gzip": 31, b"deflate": 15}.get(encoding)
        if wbits is None:
            err = ServeError(f"unsupported Content-Encoding {encoding.decode('latin-1')!r}; use gzip or deflate")
            err.status, err.kind = 415, "bad_request"
            raise err
        dec = zlib.decompressobj(wbits)
        try:
            out = dec.decompress(body, self.max_body_size + 1)
        except zlib.error as exc:
            raise BadRequest(f"body is not valid {encoding.decode()} data: {exc}") from None
        if len(out) > self.max_body_size or dec.unconsumed_tail:
            raise TooLarge(f"decompressed body exceeds {self.max_body_size} bytes")
        return out

    def _dispatch(self, conn: _Conn, head: _Head, body: bytes | bytearray) -> None:
        payload: Payload
        try:
            status, payload, ctype, extra = self._handle(head, body)
        except ServeError as exc:
            status, payload, ctype, extra = exc.status, _error_body(exc.message), JSON, b""
            self.metrics.error(exc.kind)
        except Exception as exc:  # a bug of ours or of the runtime: answer 500, keep serving
            traceback.print_exc(file=sys.stderr)
            status, payload, ctype = 500, _error_body(f"internal error: {type(exc).__name__}: {exc}"), JSON
            extra = b""
            self.metrics.error("internal")
        elapsed = time.perf_counter() - head.start
        hit = self._routes.get(head.target.split(b"?", 1)[0])
        if hit is not None and hit[1] is not None and hit[0] == "infer":
            self.metrics.record(hit[1].name, hit[1].version, status, elapsed)
        keep = head.keep_alive and not self.draining
        length = len(payload) if isinstance(payload, bytes) else sum(len(p) for p in payload)
        out = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n" % (
            status, REASONS.get(status, b"Unknown"), ctype, length, extra,
            b"" if keep else b"Connection: close\r\n",
        )
        if self.access_log:
            print(f"{conn.addr[0]} {head.method.decode()} {head.target.decode('latin-1')} "
                  f"{status} {length} {elapsed * 1000:.3f}ms", file=sys.stderr)
        if head.method == b"HEAD":
            self._send(conn, out)
        elif length < LARGE:
            self._send(conn, out + (payload if isinstance(payload, bytes) else b"".join(payload)))
        else:
            self._send_parts(conn, [out, payload] if isinstance(payload, bytes) else [out, *payload])
        if not keep:
            self._finish(conn)

    def _fail(self, conn: _Conn, exc: ServeError, *, close: bool) -> None:
        """Answer a request we could not read to the end, then close the connection."""
        self.metrics.error(exc.kind)
        body = _error_body(exc.message)
        self._send(conn, b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                   % (exc.status, REASONS.get(exc.status, b"Error"), len(body), body))
        if close:
            self._finish(conn)

    def _finish(self, conn: _Conn) -> None:
        """Close once the answer is out; unread input is drained first so the peer sees it."""
        conn.close_after = True
        conn.inbuf.clear()
        conn.body = None
        if not conn.outbuf and conn.outq is None:
            self._half_close(conn)

    def _half_close(self, conn: _Conn) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.discard = True
        conn.last = time.monotonic()

    def _send(self, conn: _Conn, data: bytes) -> None:
        if conn.outq is not None:  # behind a large answer: keep the order
            conn.outq.append(memoryview(data))
            return
        if conn.outbuf:
            conn.outbuf += data
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent < len(data):
            conn.outbuf += data[sent:]
            self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _send_parts(self, conn: _Conn, parts: list[bytes | memoryview]) -> None:
        """Write a large answer from its pieces; what the socket does not take waits in ``outq``."""
        queue = deque(memoryview(p) for p in parts if len(p))
        if conn.outbuf:  # never behind a small answer, but keep the order if it happens
            queue.appendleft(memoryview(bytes(conn.outbuf)))
            conn.outbuf.clear()
        conn.outq = queue
        if self._pump(conn) and conn.outq is not None:
            self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _pump(self, conn: _Conn) -> bool:
        """Send from ``outq`` until the socket is full or the queue empty (then ``outq`` is None).

        False when the connection broke and was closed.
        """
        queue = conn.outq
        assert queue is not None
        while queue:
            try:
                sent = conn.sock.sendmsg(list(queue)[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self._close(conn)
                return False
            while sent:
                first = queue[0]
                if sent < len(first):
                    queue[0] = first[sent:]
                    break
                sent -= len(first)
                queue.popleft()
        conn.outq = None
        return True

    def _flush(self, conn: _Conn) -> None:
        if conn.outq is not None:
            if not self._pump(conn) or conn.outq is not None:
                return
            if conn.trim:
                conn.trim = False
                give_back_memory()
        else:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            del conn.outbuf[:sent]
            if conn.outbuf:
                return
        self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
        if conn.close_after:
            self._half_close(conn)
        else:
            self._process(conn)

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self._conns.values()):
            idle = now - conn.last
            lingering = conn.discard and idle > 2.0
            idle_in_drain = (
                self.draining and conn.head is None and not conn.inbuf and not conn.outbuf
                and conn.outq is None
            )
            if lingering or idle > self.idle_timeout or idle_in_drain:
                self._close(conn)

    # -- lifecycle -------------------------------------------------------------------------

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Start a graceful drain; safe to call from another thread or a signal handler."""
        if self._stop_at is None:
            self._stop_at = time.monotonic() + self.drain_timeout
        self.draining = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def serve_forever(self, on_ready: Callable[[Server], None] | None = None) -> None:
        self._install_signals()
        if on_ready is not None:
            on_ready(self)
        sel = self._sel
        last_sweep = time.monotonic()
        try:
            while True:
                if self.draining:
                    if self._listener is not None:
                        sel.unregister(self._listener)
                        self._listener.close()
                        self._listener = None
                    self._sweep()
                    assert self._stop_at is not None
                    if not self._conns or time.monotonic() > self._stop_at:
                        return
                for key, mask in sel.select(0.2 if self.draining else 1.0):
                    data = key.data
                    if data is None:
                        self._accept()
                    elif data == "wake":
                        try:
                            while self._wake_r.recv(512):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                    else:
                        if mask & selectors.EVENT_READ:
                            self._read(data)
                        if mask & selectors.EVENT_WRITE and data.sock.fileno() >= 0:
                            self._flush(data)
                now = time.monotonic()
                if now - last_sweep > 1.0:
                    last_sweep = now
                    self._sweep()
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            if self._listener is not None:
                self._listener.close()
            sel.close()
            self._wake_r.close()
            self._wake_w.close()


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), "") if v.isdigit() else (-1, v)

