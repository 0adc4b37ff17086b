"""The daemon's HTTP framing on a raw socket: keep-alive after errors, honest closes, JSON always.

A client that reuses connections (httpx, every CLI command) must never race
a close the server did not announce: every reply that ends the connection
says ``Connection: close``, and a reply to a request whose body was read
keeps the connection open. These tests speak HTTP/1.1 by hand so nothing
between them and the server smooths it over.
"""

from __future__ import annotations

import json
import socket

from control_helpers import LiveDaemon


class Conn:
    """One TCP connection; requests written by hand, responses read by Content-Length."""

    def __init__(self, live: LiveDaemon) -> None:
        host, port = live.url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buf = b""
        self.auth = f"Authorization: Bearer {live.token}\r\n".encode()

    def send(self, method: str, path: str, body: bytes = b"", *, auth: bool = True,
             extra: bytes = b"") -> None:
        head = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n".encode()
                + (self.auth if auth else b"") + extra)
        if (body or method in ("POST", "PUT")) and b"Content-Length" not in extra:
            head += f"Content-Length: {len(body)}\r\n".encode()
        self.sock.sendall(head + b"\r\n" + body)

    def reply(self, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed before a reply; got {self.buf!r}"
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        length = 0 if head_only else int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed inside a body"
            self.buf += chunk
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed(self) -> bool:
        self.sock.settimeout(5)
        return self.buf == b"" and self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


def test_keep_alive_survives_error_replies_whose_body_was_read(live: LiveDaemon) -> None:
    conn = Conn(live)
    try:
        for method, path, body, status in [
            ("GET", "/v1/events?tail=x", b"", 400),
            ("GET", "/v1/objects/InferenceService/ghost", b"", 404),
            ("POST", "/v1/objects", b"{}", 405),            # a small unread body is drained
            ("POST", "/v1/apply", b"kind: Nope\n", 422),
            ("POST", "/v1/apply", b"\xff\xfe", 400),
            ("GET", "/v1/objects", b"", 200),
        ]:
            conn.send(method, path, body)
            got, headers, raw = conn.reply()
            assert got == status, (method, path, raw)
            assert headers.get("connection") != "close", (method, path)
            assert headers["content-type"] == "application/json"
        conn.send("GET", "/v1/objects", auth=False)  # a refused credential keeps it open too
        assert conn.reply()[0] == 401
        conn.send("GET", "/v1/objects")
        assert conn.reply()[0] == 200
    finally:
        conn.close()


def test_a_reply_that_ends_the_connection_says_so(live: LiveDaemon) -> None:
    for method, path, extra, status in [
        ("POST", "/v1/apply", b"Content-Length: 99999999\r\n", 413),  # body left unread
        ("POST", "/v1/apply", b"Content-Length: nope\r\n", 400),
        ("POST", "/v1/apply", b"Transfer-Encoding: chunked\r\n", 411),
        ("POST", "/v1/apply", b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", 411),
        ("POST", "/v1/apply", b"Content-Length: 3\r\nContent-Length: 4\r\n", 400),
    ]:
        conn = Conn(live)
        try:
            conn.send(method, path, extra=extra)
            got, headers, body = conn.reply()
            assert got == status, body
            assert headers["connection"] == "close"
            assert "error" in json.loads(body)
            assert conn.closed()
        finally:
            conn.close()


def test_other_methods_get_the_apis_json_405_with_allow(live: LiveDaemon) -> None:
    conn = Conn(live)
    try:
        for method in ("TRACE", "OPTIONS", "PUT", "PATCH"):
            conn.send(method, "/v1/objects")
            status, headers, body = conn.reply()
            assert status == 405, (method, body)
            assert headers["allow"] == "GET"
            assert headers["content-type"] == "application/json"
            assert json.loads(body)["allowed"] == ["GET"]
        conn.send("HEAD", "/v1/objects")  # HEAD: the same status and headers, no body
        status, headers, _ = conn.reply(head_only=True)
        assert status == 405 and headers["allow"] == "GET"
        conn.send("GET", "/v1/objects")
        assert conn.reply()[0] == 200  # HEAD sent no body that could desynchronise the stream
    finally:
        conn.close()
    conn = Conn(live)
    try:
        conn.send("BREW", "/v1/objects")
        status, headers, body = conn.reply()
        assert status == 501 and headers["content-type"] == "application/json"
        assert "error" in json.loads(body)
    finally:
        conn.close()
    conn = Conn(live)
    try:
        conn.sock.sendall(b"garbage\r\n\r\n")
        status, headers, body = conn.reply()
        assert status == 400 and headers["content-type"] == "application/json"
    finally:
        conn.close()


def test_out_of_range_numbers_are_400_not_500(live: LiveDaemon) -> None:
    conn = Conn(live)
    try:
        for query in ("after=9999999999999999999", "limit=9999999999999999999",
                      "tail=9999999999999999999", "after=" + "9" * 5000, "after=9223372036854775807"):
            conn.send("GET", f"/v1/events?{query}")
            status, _, body = conn.reply()
            expected = 200 if query.endswith("854775807") else 400
            assert status == expected, (query, body)
            if status == 400:
                assert "whole number from 0 to 9223372036854775807" in json.loads(body)["error"]
    finally:
        conn.close()
