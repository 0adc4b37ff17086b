"""The endpoint's pure parts: HTTP framing and the choice of replica."""

from __future__ import annotations

import collections

import pytest

from uniframe.control.proxy.balancer import BackendState, Balancer
from uniframe.control.proxy.framing import (
    ChunkScanner,
    FramingError,
    parse_request_head,
    parse_response_head,
    request_head,
)

# -- framing ---------------------------------------------------------------------------------


def test_request_heads_keep_alive_and_length() -> None:
    h = parse_request_head(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 82")
    assert (h.method, h.target, h.keep_alive, h.length, h.chunked, h.is_head) == (
        b"POST", b"/v2/models/iris/infer", True, 82, False, False)
    assert not parse_request_head(b"GET / HTTP/1.1\r\nConnection: close").keep_alive
    assert not parse_request_head(b"GET / HTTP/1.0").keep_alive
    assert parse_request_head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive").keep_alive
    assert parse_request_head(b"HEAD / HTTP/1.1").is_head
    h = parse_request_head(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nEXPECT: 100-Continue")
    assert h.chunked and h.expect_continue and h.length == 0
    # the same length twice is harmless
    assert parse_request_head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3").length == 3


@pytest.mark.parametrize(("head", "status", "words"), [
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked", 400, "both"),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4", 400, "conflicting"),
    (b"POST / HTTP/1.1\r\nContent-Length: -3", 400, "not a number"),
    (b"POST / HTTP/1.1\r\nContent-Length : 3", 400, "whitespace before the colon"),
    (b"POST / HTTP/1.1\r\nX: a\r\n folded", 400, "folding"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip", 501, "only chunked"),
    (b"GET / HTTP/2.0", 505, "protocol version"),
    (b"GET /\r\nHost: x", 400, "request line"),
    (b"POST / HTTP/1.1\nContent-Length: 3", 400, "request line"),
])
def test_request_heads_that_could_desynchronise_are_refused(head: bytes, status: int, words: str) -> None:
    with pytest.raises(FramingError, match=words) as info:
        parse_request_head(head)
    assert info.value.status == status


def test_request_head_cache_returns_the_same_answer() -> None:
    raw = b"POST /x HTTP/1.1\r\nContent-Length: 9"
    assert request_head(raw) is request_head(bytes(raw))
    assert request_head(raw).length == 9


def test_response_heads() -> None:
    r = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 203", False)
    assert (r.status, r.keep_alive, r.length, r.chunked, r.until_close) == (200, True, 203, False, False)
    assert parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 9", True).length == 0  # HEAD
    assert parse_response_head(b"HTTP/1.1 204 No Content", False).length == 0
    assert parse_response_head(b"HTTP/1.1 100 Continue", False).status == 100
    r = parse_response_head(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\nConnection: close", False)
    assert (r.status, r.keep_alive) == (503, False)
    assert parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", False).chunked
    r = parse_response_head(b"HTTP/1.0 200 OK", False)
    assert r.until_close and not r.keep_alive
    with pytest.raises(FramingError):
        parse_response_head(b"SMTP 220 hello", False)


def _chunked(parts: list[bytes], trailer: bytes = b"") -> bytes:
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n" + trailer + b"\r\n"


def test_chunk_scanner_finds_the_end_however_the_body_is_split() -> None:
    body = _chunked([b"hello", b"\r\n0\r\n\r\n tricky data", b"x" * 300], trailer=b"X-T: 1\r\n")
    tail = b"GET /next HTTP/1.1\r\n\r\n"
    stream = body + tail
    assert ChunkScanner().feed(stream) == len(body)
    for step in (1, 2, 7, 64):
        s = ChunkScanner()
        end = -1
        for i in range(0, len(stream), step):
            end = s.feed(stream[i : i + step])
            if end >= 0:
                assert i + end == len(body)
                break
        assert end >= 0
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert ChunkScanner().feed(head + stream, len(head)) == len(head) + len(body)
    with pytest.raises(FramingError, match="chunk size"):
        ChunkScanner().feed(b"zz\r\n")
    with pytest.raises(FramingError, match="limit"):
        ChunkScanner(limit=10).feed(_chunked([b"x" * 11]))


# -- balancer --------------------------------------------------------------------------------


def _balancer(*specs: tuple[str, str]) -> Balancer:
    bal = Balancer()
    for i, (name, group) in enumerate(specs):
        bal.backends[name] = BackendState(name, "127.0.0.1", 9000 + i, group)
    bal.rebuild()
    return bal


def _picks(bal: Balancer, n: int) -> list[BackendState]:
    out = [bal.pick() for _ in range(n)]
    assert all(b is not None for b in out)
    return [b for b in out if b is not None]


def test_ties_rotate_and_least_outstanding_wins() -> None:
    bal = _balancer(("a", "v1"), ("b", "v1"), ("c", "v1"))
    assert [p.id for p in _picks(bal, 6)] == ["a", "b", "c", "a", "b", "c"]
    bal.backends["a"].outstanding = 3
    bal.backends["b"].outstanding = 1
    bal.backends["c"].outstanding = 2
    assert {p.id for p in _picks(bal, 5)} == {"b"}
    b = bal.pick(exclude={"b"})
    assert b is not None and b.id == "c"
    assert bal.pick(exclude={"a", "b", "c"}) is None


def test_only_eligible_backends_are_picked() -> None:
    bal = _balancer(("a", "v1"), ("b", "v1"), ("c", "v1"), ("d", "v1"))
    bal.backends["a"].healthy = False
    bal.backends["b"].ready = False
    bal.backends["c"].draining = True
    bal.rebuild()
    assert {p.id for p in _picks(bal, 8)} == {"d"}
    bal.backends["d"].removed = True
    bal.rebuild()
    assert bal.pick() is None and not bal.has_eligible()


def test_weights_split_exactly_and_follow_eligibility() -> None:
    bal = _balancer(("a", "v1"), ("b", "v1"), ("c", "v2"))
    bal.weights = {"v1": 90, "v2": 10}
    bal.rebuild()
    counts = collections.Counter(p.group for p in _picks(bal, 1000))
    assert counts == {"v1": 900, "v2": 100}
    # smooth: the canary's share is spread out, not sent in a burst
    window = [p.group for p in _picks(bal, 100)]
    assert all(window[i : i + 10].count("v2") == 1 for i in range(0, 100, 10))
    bal.backends["c"].healthy = False  # the canary group has no one left: its share goes to v1
    bal.rebuild()
    assert {p.group for p in _picks(bal, 50)} == {"v1"}
    bal.weights = {"v1": 0, "v2": 100}  # weight 0, or no weight at all, means no traffic
    bal.rebuild()
    assert bal.pick() is None and not bal.has_eligible()
    bal.weights = {"v2": 1}
    bal.backends["c"].healthy = True
    bal.rebuild()
    assert {p.id for p in _picks(bal, 10)} == {"c"}
    assert bal.pick(exclude={"c"}) is None
