"""Every error case answers with a clear message, and the server keeps serving afterwards."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from serve_support import IRIS_BODY, RunningServer, assert_healthy


def X(shape: list[int], data: Any, datatype: str = "FP32", name: str = "X") -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


BAD_REQUESTS: list[tuple[str, Any, str]] = [
    ("wrong shape", X([1, 5], [1, 2, 3, 4, 5]), "input 'X': shape [1,5] given, model expects [-1,4]"),
    ("wrong rank", X([4], [1, 2, 3, 4]), "shape [4] given, model expects [-1,4]"),
    ("count mismatch", X([2, 4], [1, 2, 3, 4]), "shape [2,4] needs 8 elements, data has 4"),
    ("wrong datatype", X([1, 4], [1, 2, 3, 4], "FP64"), "input 'X': datatype 'FP64' given, model expects FP32"),
    ("unknown input", X([1, 4], [1, 2, 3, 4], name="Y"), "unknown input 'Y'; model 'iris' takes 'X'"),
    ("strings for floats", X([1, 4], ["a", "b", "c", "d"]), "FP32 data contains strings"),
    ("ragged data", X([2, 2], [[1, 2], [3]]), "input 'X'"),
    ("negative dim", X([-1, 4], [1, 2, 3, 4]), "shape must be a list of non-negative integers"),
    ("no inputs", {"inputs": []}, "non-empty 'inputs' list"),
    ("not an object", [1, 2], "must be a JSON object"),
    ("no data", {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32"}]}, "needs 'data'"),
    ("unknown output", {**IRIS_BODY, "outputs": [{"name": "nope"}]}, "unknown output 'nope'; model 'iris' has 'label', 'probabilities'"),
    ("duplicate input", {"inputs": IRIS_BODY["inputs"] * 2}, "input 'X' is given twice"),
    ("binary without header", {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                                           "parameters": {"binary_data_size": 16}}]},
     "no Inference-Header-Content-Length"),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_400_with_message(server: RunningServer, case: str, body: Any, message: str) -> None:
    r = server.client.post("/v2/models/iris/infer", json=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert_healthy(server)


def test_missing_input(server: RunningServer) -> None:
    body = {"inputs": [{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    r = server.client.post("/v2/models/two/infer", json=body)
    assert r.status_code == 400
    assert r.json()["error"] == "missing input(s) 'b' for model 'two'"


def test_integer_checks(server: RunningServer) -> None:
    def post(datatype: str, data: list[Any]) -> tuple[int, str]:
        body = {"inputs": [{"name": "x", "shape": [1, len(data)], "datatype": datatype, "data": data}]}
        r = server.client.post(f"/v2/models/id_{datatype.lower()}/infer", json=body)
        return r.status_code, r.text

    status, text = post("INT8", [1, 300])
    assert status == 400 and "out of range for INT8" in text
    assert "out of range for UINT32" in post("UINT32", [-1])[1]
    assert "non-integer" in post("INT64", [1.5])[1]
    assert "booleans" in post("FP32", [True])[1]
    assert post("INT64", [3, 4])[0] == 200


def test_invalid_json(server: RunningServer) -> None:
    r = server.client.post("/v2/models/iris/infer", content=b"{not json")
    assert r.status_code == 400
    assert r.json()["error"].startswith("request body is not valid JSON")
    assert_healthy(server)


def test_binary_size_errors(server: RunningServer) -> None:
    import orjson

    def post(header: dict[str, Any], blob: bytes, hlen: int | None = None) -> str:
        head = orjson.dumps(header)
        r = server.client.post("/v2/models/iris/infer", content=head + blob, headers={
            "Inference-Header-Content-Length": str(len(head) if hlen is None else hlen)})
        assert r.status_code == 400, r.text
        return str(r.json()["error"])

    inp = {"name": "X", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 12}}
    assert "needs 16 bytes, binary_data_size is 12" in post({"inputs": [inp]}, b"\0" * 12)
    inp16 = {**inp, "parameters": {"binary_data_size": 16}}
    assert "does not fit the 8 binary bytes left" in post({"inputs": [inp16]}, b"\0" * 8)
    assert "not claimed" in post({"inputs": [inp16]}, b"\0" * 20)
    assert "body has only" in post({"inputs": [inp16]}, b"", hlen=10_000)
    assert_healthy(server)


def test_not_found_and_method(server: RunningServer) -> None:
    c = server.client
    r = c.post("/v2/models/nope/infer", json=IRIS_BODY)
    assert r.status_code == 404
    assert "unknown model 'nope'" in r.json()["error"]
    r = c.get("/v2/models/iris/versions/9")
    assert r.status_code == 404
    assert r.json()["error"] == "model 'iris' has no version '9'; versions: 1, 2"
    assert c.get("/nothing/here").status_code == 404
    r = c.get("/v2/models/iris/infer")
    assert r.status_code == 405 and "takes POST" in r.json()["error"]
    assert c.post("/v2/health/live").status_code == 405
    assert_healthy(server)


def test_body_over_limit_is_413(server: RunningServer) -> None:
    # The test server runs with --max-body-size 1Mi.
    big = b'{"inputs":[{"name":"X","shape":[1,4],"datatype":"FP32","data":[' + b"1," * 600_000 + b"1]}]}"
    r = server.client.post("/v2/models/iris/infer", content=big)
    assert r.status_code == 413
    assert "exceeds the limit of 1048576 bytes" in r.json()["error"]
    assert_healthy(server)


def test_headers_over_limit_is_431(server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /v2 HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        assert s.recv(1000).startswith(b"HTTP/1.1 431 ")
    assert_healthy(server)


def test_garbage_request_line(server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"HELLO\r\n\r\n")
        assert s.recv(1000).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /v2 HTTP/2.0\r\n\r\n")
        assert s.recv(1000).startswith(b"HTTP/1.1 505 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nContent-Length: zz\r\n\r\n")
        assert s.recv(1000).startswith(b"HTTP/1.1 400 ")
    assert_healthy(server)


def test_client_disconnects_mid_body(server: RunningServer) -> None:
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nContent-Length: 500\r\n\r\n{\"inp")
    assert_healthy(server)


@pytest.mark.slow
def test_bad_requests_do_not_leak_memory(server: RunningServer) -> None:
    """Thousands of rejected requests leave the server's RSS where it was."""
    bodies = [b for _, b, _ in BAD_REQUESTS]

    def burst(n: int) -> None:
        for i in range(n):
            server.client.post("/v2/models/iris/infer", json=bodies[i % len(bodies)])
            server.client.post("/v2/models/nope/infer", content=b"x")

    burst(500)  # warm up allocator pools and caches
    before = server.rss_kb()
    burst(3000)
    after = server.rss_kb()
    assert after - before < 4096, f"RSS grew from {before} kB to {after} kB"
    assert_healthy(server)
