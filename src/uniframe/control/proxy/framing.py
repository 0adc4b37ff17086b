"""HTTP/1.1 message framing for a pass-through proxy: where a message ends, never what it says.

The model server (:mod:`uniframe.serve.http`) decodes what it reads: it splits
headers into a dict, de-chunks and decompresses bodies. A proxy must do less:
find where each request and each response ends so it can forward the bytes
untouched, and learn the few facts that steer the connection (keep-alive,
``Expect: 100-continue``, a ``HEAD`` request, the status). So this module
scans the lowercased head for the handful of headers that matter, with C-level
``bytes.find`` calls instead of a Python loop over every line, and counts
chunk sizes without copying the data out. Importing the server's code instead
would drag numpy and onnxruntime into the proxy process for none of its work.

It refuses what could make the proxy and a replica disagree about where a
request ends (request smuggling): both ``Content-Length`` and
``Transfer-Encoding``, a transfer coding other than chunked, conflicting
lengths, whitespace before a colon, and obsolete line folding.
"""

from __future__ import annotations

_CL = b"\r\ncontent-length:"
_TE = b"\r\ntransfer-encoding:"
_CONN = b"\r\nconnection:"
_EXPECT = b"\r\nexpect:"


class FramingError(Exception):
    """A message cannot be framed; ``status`` is what to answer a client with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _header(low: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (``b"\\r\\nname:"``) in a lowercased head; None if absent.

    A header given twice with different values is refused: the one place this
    matters (lengths) must not be ambiguous, and the others are never repeated
    by sane clients.
    """
    i = low.find(name)
    if i < 0:
        return None
    start = i + len(name)
    end = low.find(b"\r\n", start)
    value = (low[start:] if end < 0 else low[start:end]).strip()
    j = low.find(name, start)
    if j >= 0:
        end2 = low.find(b"\r\n", j + len(name))
        other = (low[j + len(name):] if end2 < 0 else low[j + len(name):end2]).strip()
        if other != value:
            raise FramingError(400, f"conflicting {name[2:-1].decode()} headers")
    return value


def _check_lines(low: bytes) -> None:
    if b" :" in low or b"\t:" in low:
        raise FramingError(400, "malformed header line: whitespace before the colon")
    if b"\r\n " in low or b"\r\n\t" in low:
        raise FramingError(400, "obsolete header line folding is not accepted")
    if b"\n" in low.replace(b"\r\n", b""):
        raise FramingError(400, "malformed header block: bare LF")


def _length(raw: bytes) -> int:
    if not raw.isdigit():
        raise FramingError(400, f"Content-Length {raw[:40]!r} is not a number")
    return int(raw)


class RequestHead:
    """What the proxy needs to know about one request; the bytes themselves go on untouched."""

    __slots__ = ("chunked", "expect_continue", "is_head", "keep_alive", "length", "method", "target")

    def __init__(self, method: bytes, target: bytes, keep_alive: bool, length: int, chunked: bool,
                 expect_continue: bool) -> None:
        self.method = method
        self.target = target
        self.keep_alive = keep_alive
        self.length = length
        self.chunked = chunked
        self.expect_continue = expect_continue
        self.is_head = method == b"HEAD"


_request_heads: dict[bytes, RequestHead] = {}
_response_heads: dict[tuple[bytes, bool], ResponseHead] = {}
_CACHE_SIZE = 512


def request_head(head: bytes) -> RequestHead:
    """:func:`parse_request_head`, memoized: clients repeat the same heads request after request.

    Parsing costs a few microseconds of the relay's ~20 per request; a dict
    hit costs a tenth of one. Heads are immutable, so a hit is as good as a
    parse. The cache is bounded by starting over when full, which keeps
    clients that vary their heads from growing it.
    """
    hit = _request_heads.get(head)
    if hit is None:
        hit = parse_request_head(head)
        if len(_request_heads) >= _CACHE_SIZE:
            _request_heads.clear()
        _request_heads[head] = hit
    return hit


def response_head(head: bytes, request_is_head: bool) -> ResponseHead:
    """:func:`parse_response_head`, memoized like :func:`request_head`: replicas repeat theirs too."""
    key = (head, request_is_head)
    hit = _response_heads.get(key)
    if hit is None:
        hit = parse_response_head(head, request_is_head)
        if len(_response_heads) >= _CACHE_SIZE:
            _response_heads.clear()
        _response_heads[key] = hit
    return hit


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a request head (request line and headers, without the final blank line)."""
    eol = head.find(b"\r\n")
    line = head if eol < 0 else head[:eol]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise FramingError(400, f"malformed request line {line[:200]!r}")
    method, target, version = parts
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        raise FramingError(505, f"unsupported protocol version {version[:20]!r}")
    low = head.lower()
    _check_lines(low)
    conn = _header(low, _CONN) or b""
    keep_alive = b"close" not in conn if version == b"HTTP/1.1" else b"keep-alive" in conn
    te = _header(low, _TE)
    cl = _header(low, _CL)
    chunked = False
    length = 0
    if te is not None:
        if cl is not None:
            raise FramingError(400, "a request may not carry both Content-Length and Transfer-Encoding")
        if te != b"chunked":
            raise FramingError(501, f"unsupported Transfer-Encoding {te[:40]!r}; only chunked is")
        chunked = True
    elif cl is not None:
        length = _length(cl)
    expect = _header(low, _EXPECT)
    return RequestHead(method, target, keep_alive, length, chunked, expect == b"100-continue")


class ResponseHead:
    """How one response is framed: by length, by chunks, by the connection closing, or empty."""

    __slots__ = ("chunked", "keep_alive", "length", "status", "until_close")

    def __init__(self, status: int, keep_alive: bool, length: int, chunked: bool,
                 until_close: bool) -> None:
        self.status = status
        self.keep_alive = keep_alive
        self.length = length
        self.chunked = chunked
        self.until_close = until_close


def parse_response_head(head: bytes, request_is_head: bool) -> ResponseHead:
    """Parse a response head; ``request_is_head`` because a HEAD answer has no body whatever it says."""
    if head[:7] != b"HTTP/1." or head[8:9] != b" " or not head[9:12].isdigit():
        raise FramingError(502, f"malformed status line {head[:60]!r}")
    status = int(head[9:12])
    http10 = head[7:8] == b"0"
    low = head.lower()
    if b" :" in low or b"\t:" in low or b"\r\n " in low or b"\r\n\t" in low:
        raise FramingError(502, "malformed response header block")
    conn = _header(low, _CONN) or b""
    keep_alive = b"keep-alive" in conn if http10 else b"close" not in conn
    if request_is_head or status < 200 or status in (204, 304):
        return ResponseHead(status, keep_alive, 0, False, False)
    te = _header(low, _TE)
    if te is not None:
        if te.endswith(b"chunked"):
            return ResponseHead(status, keep_alive, 0, True, False)
        return ResponseHead(status, False, 0, False, True)
    cl = _header(low, _CL)
    if cl is not None:
        if not cl.isdigit():
            raise FramingError(502, f"malformed Content-Length {cl[:40]!r} in a response")
        return ResponseHead(status, keep_alive, int(cl), False, False)
    return ResponseHead(status, False, 0, False, True)


class ChunkScanner:
    """Finds the end of a chunked body fed in arbitrary pieces, without de-chunking it.

    State survives between :meth:`feed` calls, so each byte is looked at once
    however the body is split across reads.
    """

    __slots__ = ("_line", "_remaining", "_state", "total")

    _SIZE, _DATA, _TRAILER = 0, 1, 2

    def __init__(self, limit: int = 1 << 62) -> None:
        self._state = self._SIZE
        self._line = bytearray()  # a size or trailer line not yet complete
        self._remaining = 0  # data bytes plus the CRLF after them still to skip
        self.total = limit  # bytes of chunk data still allowed

    def feed(self, data: bytes | bytearray, start: int = 0) -> int:
        """Scan ``data[start:]``; the index just past the body's end, or -1 if it goes on."""
        pos = start
        end = len(data)
        while pos < end:
            if self._state == self._DATA:
                step = min(self._remaining, end - pos)
                pos += step
                self._remaining -= step
                if self._remaining == 0:
                    self._state = self._SIZE
                continue
            eol = data.find(b"\n", pos)
            if eol < 0:
                self._line += data[pos:end]
                if len(self._line) > 8192:
                    raise FramingError(400, "chunk size or trailer line longer than 8 KiB")
                return -1
            line = bytes(self._line) + bytes(data[pos:eol])
            self._line.clear()
            pos = eol + 1
            line = line.rstrip(b"\r")
            if self._state == self._TRAILER:
                if not line:
                    return pos
                continue
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise FramingError(400, f"malformed chunk size {size_text[:20]!r}") from None
            if size < 0:
                raise FramingError(400, f"malformed chunk size {size_text[:20]!r}")
            if size == 0:
                self._state = self._TRAILER
                continue
            self.total -= size
            if self.total < 0:
                raise FramingError(413, "chunked body exceeds the size limit")
            self._remaining = size + 2
            self._state = self._DATA
        return -1
