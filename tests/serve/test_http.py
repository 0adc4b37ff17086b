"""HTTP/1.1 behaviour of the model server: keep-alive, pipelining, framing, metrics, shutdown."""

from __future__ import annotations

import gzip
import json
import signal
import socket
import time
from pathlib import Path

import httpx
from serve_support import IRIS_BODY, RunningServer, assert_healthy, start_server

BODY = json.dumps(IRIS_BODY).encode()


def _request(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return (b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), extra, body))


def _read_responses(s: socket.socket, n: int) -> list[bytes]:
    """Read ``n`` complete responses (Content-Length framed) from a socket."""
    buf = b""
    out = []
    while len(out) < n:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {len(out)} responses"
        buf += chunk
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].decode()
            length = int(next(h.split(":")[1] for h in head.split("\r\n") if h.lower().startswith("content-length")))
            if len(buf) < end + 4 + length:
                break
            out.append(buf[: end + 4 + length])
            buf = buf[end + 4 + length :]
    return out


def test_keep_alive_and_pipelining(server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(_request() * 5)
        responses = _read_responses(s, 5)
        assert all(r.startswith(b"HTTP/1.1 200 OK") for r in responses)
        s.sendall(_request())  # the connection is still usable
        assert _read_responses(s, 1)[0].startswith(b"HTTP/1.1 200 OK")


def test_connection_close_and_http10(server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(_request(extra=b"Connection: close\r\n"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in data
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK")


def test_request_split_across_many_packets(server: RunningServer) -> None:
    raw = _request()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(raw), 7):
            s.sendall(raw[i : i + 7])
            time.sleep(0.001)
        assert _read_responses(s, 1)[0].startswith(b"HTTP/1.1 200 OK")


def test_chunked_body(server: RunningServer) -> None:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(BODY[i : i + 10]), BODY[i : i + 10]) for i in range(0, len(BODY), 10))
    raw = (b"POST /v2/models/iris/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
           + b"0\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(raw + _request())
        first, second = _read_responses(s, 2)
        assert first.startswith(b"HTTP/1.1 200 OK") and b'"data":[0]' in first
        assert second.startswith(b"HTTP/1.1 200 OK")


def test_expect_100_continue(server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nContent-Length: %d\r\n"
                  b"Expect: 100-continue\r\n\r\n" % len(BODY))
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(BODY)
        assert _read_responses(s, 1)[0].startswith(b"HTTP/1.1 200 OK")


def test_gzip_request_body(server: RunningServer) -> None:
    r = server.client.post("/v2/models/iris/infer", content=gzip.compress(BODY),
                           headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [0]
    r = server.client.post("/v2/models/iris/infer", content=b"xx", headers={"Content-Encoding": "br"})
    assert r.status_code == 415 and "use gzip or deflate" in r.json()["error"]
    bomb = gzip.compress(b" " * (3 << 20))  # 3 MiB of spaces inflate past the 1 MiB limit
    r = server.client.post("/v2/models/iris/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413
    assert_healthy(server)


def test_metrics(server: RunningServer) -> None:
    server.client.post("/v2/models/iris/infer", json=IRIS_BODY)
    server.client.post("/v2/models/iris/infer", json={"inputs": []})
    text = server.client.get("/metrics").text
    assert 'uniframe_infer_requests_total{model="iris",version="2",code="200"}' in text
    assert 'uniframe_infer_requests_total{model="iris",version="2",code="400"}' in text
    assert 'uniframe_infer_duration_seconds_bucket{model="iris",version="2",le="+Inf"}' in text
    assert "uniframe_requests_in_flight 1" in text  # the scrape itself
    assert 'uniframe_errors_total{kind="bad_request"}' in text

    def count(code: str) -> float:
        key = f'uniframe_infer_requests_total{{model="iris",version="2",code="{code}"}} '
        line = next(ln for ln in server.client.get("/metrics").text.splitlines() if ln.startswith(key))
        return float(line.split()[-1])

    before = count("200")
    for _ in range(3):
        server.client.post("/v2/models/iris/infer", json=IRIS_BODY)
    assert count("200") == before + 3


def test_sigterm_drains_and_exits(model_dir: Path) -> None:
    proc, port = start_server([str(model_dir / "iris.onnx")])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as busy:
        busy.sendall(_request()[:-5])  # a request half received when the signal comes
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        busy.sendall(_request()[-5:])
        resp = _read_responses(busy, 1)[0]
        assert resp.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in resp
        assert idle.recv(100) == b""  # idle keep-alive connections are closed
        assert proc.wait(timeout=10) == 0
    assert proc.stdout is not None
    assert "stopped" in proc.stdout.read()
    try:
        httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1)
        raise AssertionError("server still answers after SIGTERM")
    except httpx.ConnectError:
        pass


def test_bad_model_file_is_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    res = subprocess.run([sys.executable, "-m", "uniframe.serve", str(bad), "--port", "0"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert f"{bad}: ONNX Runtime cannot load it" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "uniframe.serve", str(tmp_path / "none.onnx")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "no such model file" in res.stderr


def test_port_taken_is_a_clear_error(server: RunningServer, model_dir: Path) -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "uniframe.serve", str(model_dir / "iris.onnx"),
                          "--host", "127.0.0.1", "--port", str(server.port)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert f"cannot listen on 127.0.0.1:{server.port}" in res.stderr
