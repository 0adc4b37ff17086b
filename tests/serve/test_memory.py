"""Memory on large requests: what one valid request may cost a replica, and what it leaves behind.

Why: a replica has a fixed memory (a VM's RAM, a container's cgroup), so a legal
request that costs many times its body can kill it. One 58 MB request once drove
a replica from 59 MiB to a 916 MiB peak and left it at 191 MiB. The slow tests
start the real server, send one large request and read the kernel's own figures
(VmHWM, the peak resident set, and VmRSS) from /proc; the others pin the body
limit rule the spec derives from ``resources.memory``, and the large-body paths
of the HTTP loop (received in place, written from pieces).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_support import start_server, stop_server, write_identity

from uniframe.build.model import ResolvedModel
from uniframe.build.unikernel import max_body_size
from uniframe.errors import BuildError
from uniframe.serve import http as serve_http
from uniframe.serve import memory
from uniframe.spec import InferenceService
from uniframe.spec import service as spec_service
from uniframe.spec.loader import check_text

MiB = 1 << 20
AFTER_MARGIN = 12 * MiB  # what a replica may keep after a large request (allocator caches)


# -- the real server's memory ---------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Replica:
    """A server process serving ``m = Identity(x)`` over FP32 [n, m], watched from /proc."""

    def __init__(self, model: Path, max_body: str) -> None:
        self.proc, port = start_server([f"m={model}", "--max-body-size", max_body])
        self.url = f"http://127.0.0.1:{port}/v2/models/m/infer"
        self.client = httpx.Client(timeout=120)

    def at_rest(self) -> int:
        """RSS after a small warm-up request, with the peak reset to it where Linux allows."""
        small = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
        assert self.client.post(self.url, json=small).status_code == 200
        time.sleep(0.3)
        with contextlib.suppress(OSError):  # clear_refs 5 resets VmHWM (Linux >= 4.0)
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        return _status(self.proc.pid)["VmRSS"]

    def peak(self) -> int:
        return _status(self.proc.pid)["VmHWM"]

    def settled_rss(self, bound: int) -> int:
        """RSS once the server has finished with the answer (it trims after the last write)."""
        deadline = time.monotonic() + 3
        rss = _status(self.proc.pid)["VmRSS"]
        while rss > bound and time.monotonic() < deadline:
            time.sleep(0.1)
            rss = _status(self.proc.pid)["VmRSS"]
        return rss

    def close(self) -> None:
        self.client.close()
        assert stop_server(self.proc) == 0


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_identity(tmp_path_factory.mktemp("mem") / "id.onnx", "FP32")


@pytest.fixture
def replica(identity: Path) -> Iterator[Replica]:
    r = Replica(identity, "64Mi")
    yield r
    r.close()


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


@pytest.mark.slow
def test_large_binary_request_peaks_at_two_bodies_and_gives_memory_back(replica: Replica) -> None:
    # Before: body copied out of a growing buffer, tensors copied into bytes and the answer
    # concatenated twice, ONNX Runtime's arena kept the output: 5.9 bodies peak, +58 MiB after.
    arr = np.random.default_rng(1).random((12_000, 1000), dtype=np.float32)  # 48 MB
    head = json.dumps({
        "inputs": [{"name": "x", "shape": list(arr.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": arr.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    body = head + arr.tobytes()
    base = replica.at_rest()
    r = replica.client.post(replica.url, content=body, headers={
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text[:300]
    json_len = int(r.headers["inference-header-content-length"])
    assert r.content[json_len:] == arr.tobytes()
    peak = replica.peak() - base
    after = replica.settled_rss(base + AFTER_MARGIN) - base
    # The body while the model runs, then the output (sent from the array itself).
    assert peak <= 2.5 * len(body), f"peak +{_mib(peak)} for a {_mib(len(body))} body"
    assert after <= AFTER_MARGIN, f"+{_mib(after)} left after the request"


@pytest.mark.slow
def test_large_json_request_stays_within_the_estimate_and_gives_memory_back(replica: Replica) -> None:
    # json.dumps of float32 values: the way most clients write a float tensor, ~21 bytes a number.
    arr = np.random.default_rng(2).random((1900, 1000), dtype=np.float32)
    body = json.dumps({"inputs": [{"name": "x", "shape": list(arr.shape), "datatype": "FP32",
                                   "data": arr.tolist()}]}).encode()
    assert len(body) > 30 * MiB
    base = replica.at_rest()
    r = replica.client.post(replica.url, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    out = r.json()["outputs"][0]
    assert out["shape"] == list(arr.shape)
    assert np.array_equal(np.asarray(out["data"], dtype=np.float32), arr.reshape(-1))
    peak = replica.peak() - base
    after = replica.settled_rss(base + AFTER_MARGIN) - base
    # The body while orjson parses it, plus what the server estimated the parse costs;
    # within the spec's rule for a replica whose limit is this body.
    assert peak <= len(body) + memory.json_cost(body), f"peak +{_mib(peak)}"
    assert peak <= spec_service.PEAK_FACTOR * len(body), f"peak +{_mib(peak)}"
    assert after <= AFTER_MARGIN, f"+{_mib(after)} left after the request"


@pytest.mark.slow
def test_dense_json_is_refused_before_it_is_parsed(replica: Replica) -> None:
    # "0.5," is 4 bytes of text and 56 bytes of parse: before, this legal body of 24 MB
    # took the replica to ~15x its size; now it is refused for what parsing it would cost.
    n = 6_000_000
    body = (b'{"inputs":[{"name":"x","shape":[%d,1000],"datatype":"FP32","data":[' % (n // 1000)
            + b",".join([b"0.5"] * n) + b"]}]}")
    assert len(body) <= 64 * MiB
    base = replica.at_rest()
    r = replica.client.post(replica.url, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert "binary tensor data extension" in r.json()["error"]
    peak = replica.peak() - base
    assert peak <= 1.5 * len(body), f"peak +{_mib(peak)} for a {_mib(len(body))} body"
    assert replica.client.post(replica.url, json={"inputs": [
        {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0.5]}]}).status_code == 200


# -- the large-body paths of the HTTP loop ---------------------------------------------------


@pytest.fixture(scope="module")
def big_server(identity: Path) -> Iterator[int]:
    proc, port = start_server([f"m={identity}", "--max-body-size", "64Mi"])
    yield port
    assert stop_server(proc) == 0


def _binary_request(arr: np.ndarray, *, extra: bytes = b"") -> bytes:
    head = json.dumps({"inputs": [{"name": "x", "shape": list(arr.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": arr.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    body = head + arr.tobytes()
    return (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
            b"Inference-Header-Content-Length: %d\r\n%s\r\n" % (len(body), len(head), extra)) + body


def _read_response(s: socket.socket, buf: bytearray) -> tuple[bytes, dict[str, str], bytes]:
    """One Content-Length framed response from ``s``; what follows it stays in ``buf``."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(1 << 20)
        assert chunk, "connection closed before a response"
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    lines = bytes(buf[:end]).decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers["content-length"])
    while len(buf) < end + 4 + length:
        chunk = s.recv(1 << 20)
        assert chunk, "connection closed inside a response"
        buf += chunk
    body = bytes(buf[end + 4 : end + 4 + length])
    del buf[: end + 4 + length]
    return lines[0].encode(), headers, body


def _tensor(headers: dict[str, str], body: bytes) -> bytes:
    return body[int(headers["inference-header-content-length"]):]


def test_request_pipelined_after_a_large_body_is_answered_in_order(big_server: int) -> None:
    big = np.arange(600_000, dtype=np.float32).reshape(600, 1000)  # 2.4 MB: the in-place path
    small = np.array([[1.5, -2.0]], dtype=np.float32)
    with socket.create_connection(("127.0.0.1", big_server), timeout=30) as s:
        s.sendall(_binary_request(big) + _binary_request(small))  # one write: both in one buffer
        buf = bytearray()
        status, headers, body = _read_response(s, buf)
        assert status.startswith(b"HTTP/1.1 200"), body[:200]
        assert _tensor(headers, body) == big.tobytes()
        status, headers, body = _read_response(s, buf)
        assert status.startswith(b"HTTP/1.1 200"), body[:200]
        assert _tensor(headers, body) == small.tobytes()


def test_large_body_in_slow_pieces_and_after_100_continue(big_server: int) -> None:
    arr = np.random.default_rng(3).random((400, 1000), dtype=np.float32)
    raw = _binary_request(arr, extra=b"Expect: 100-continue\r\n")
    split = raw.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", big_server), timeout=30) as s:
        s.sendall(raw[:split])
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        for at in range(split, len(raw), 700_001):
            s.sendall(raw[at : at + 700_001])
            time.sleep(0.05)
        status, headers, body = _read_response(s, bytearray())
    assert status.startswith(b"HTTP/1.1 200"), body[:200]
    assert _tensor(headers, body) == arr.tobytes()


def test_large_chunked_and_gzip_json_bodies(big_server: int) -> None:
    arr = np.random.default_rng(4).random((300, 1000), dtype=np.float32)
    text = json.dumps({"inputs": [{"name": "x", "shape": list(arr.shape), "datatype": "FP32",
                                   "data": arr.tolist()}]}).encode()
    assert len(text) > memory.LARGE
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(text[i : i + 65536]), text[i : i + 65536])
                      for i in range(0, len(text), 65536)) + b"0\r\n\r\n"
    packed = zlib.compress(text)
    requests = [
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks,
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Encoding: deflate\r\n"
        b"Content-Length: %d\r\n\r\n" % len(packed) + packed,
    ]
    with socket.create_connection(("127.0.0.1", big_server), timeout=30) as s:
        buf = bytearray()
        for raw in requests:
            s.sendall(raw)
            status, _, body = _read_response(s, buf)
            assert status.startswith(b"HTTP/1.1 200"), body[:200]
            out = json.loads(body)["outputs"][0]
            assert np.array_equal(np.asarray(out["data"], dtype=np.float32), arr.reshape(-1))


def test_large_answer_then_close_is_written_in_full(big_server: int) -> None:
    arr = np.random.default_rng(5).random((2000, 1000), dtype=np.float32)  # 8 MB answer
    with socket.create_connection(("127.0.0.1", big_server), timeout=30) as s:
        s.sendall(_binary_request(arr, extra=b"Connection: close\r\n"))
        time.sleep(0.3)  # let the server fill the socket and queue the rest
        status, headers, body = _read_response(s, bytearray())
        assert headers.get("connection") == "close"
        assert s.recv(1) == b""
    assert status.startswith(b"HTTP/1.1 200")
    assert _tensor(headers, body) == arr.tobytes()


# -- the rule: the body limit a replica's memory allows -------------------------------------


def _service(**spec: object) -> InferenceService:
    return InferenceService.model_validate({
        "apiVersion": "uniframe.dev/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "m"}, "spec": {"model": {"uri": "m.onnx"}, **spec}})


def test_default_limit_follows_memory() -> None:
    limit = _service().spec.server.body_limit
    assert limit(256 * MiB) == 26 * MiB  # (256 - 96) / 6, in whole MiB
    assert limit(128 * MiB) == 5 * MiB
    assert limit(256 * MiB, model_bytes=20 * MiB) == 20 * MiB  # the model's weights count twice
    assert limit(1024 * MiB) == 64 * MiB  # never more than 64Mi unless asked
    assert limit(8 * 1024 * MiB) == 64 * MiB


def test_the_spec_rule_uses_the_servers_measured_factor() -> None:
    # The spec cannot import the server's module (tests/spec/test_spec_imports.py): held equal here.
    assert spec_service.PEAK_FACTOR == memory.PEAK_FACTOR


def test_explicit_limit_wins_when_it_fits() -> None:
    svc = _service(resources={"memory": "1Gi"}, server={"maxBodySize": "150Mi"})
    assert svc.spec.server.body_limit(svc.spec.resources.memory) == 150 * MiB


@pytest.mark.parametrize(("extra", "path", "words"), [
    ("  server: {maxBodySize: 64Mi}\n", "spec.server.maxBodySize",
     "maxBodySize 64Mi does not fit resources.memory 256Mi"),
    ("  resources: {memory: 512Mi}\n  server: {maxBodySize: 100Mi}\n", "spec.server.maxBodySize",
     "at most 69Mi fits"),
    ("  resources: {memory: 100Mi}\n", "spec.resources.memory", "give it at least 102Mi"),
])
def test_limit_that_cannot_fit_is_a_spec_error(extra: str, path: str, words: str) -> None:
    text = ("apiVersion: uniframe.dev/v1alpha1\nkind: InferenceService\nmetadata: {name: m}\n"
            "spec:\n  model: {uri: ./m.onnx}\n" + extra)
    report = check_text(text, "svc.yaml")
    assert not report.ok
    assert [(p.path, words in p.message) for p in report.problems] == [(path, True)], report.problems


def test_builder_checks_the_limit_again_with_the_model(tmp_path: Path) -> None:
    weights = tmp_path / "big.onnx"
    weights.write_bytes(b"\0" * (40 * MiB))
    model = ResolvedModel("m", "1", weights, "0" * 64, "test")
    assert max_body_size(_service(), model) == 13 * MiB  # (256 - 96 - 80) / 6
    with pytest.raises(BuildError, match=r"^spec\.server\.maxBodySize: maxBodySize 20Mi does not fit"):
        max_body_size(_service(server={"maxBodySize": "20Mi"}), model)
    with pytest.raises(BuildError, match=r"^spec\.resources\.memory: .* too small"):
        max_body_size(_service(resources={"memory": "160Mi"}), model)


def test_give_back_memory_works_without_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoTrim:  # a libc without malloc_trim (musl)
        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)

    monkeypatch.setattr(ctypes, "CDLL", lambda name: NoTrim())
    assert serve_http._load_malloc_trim() is None
    monkeypatch.setattr(serve_http, "_malloc_trim", None)
    serve_http.give_back_memory()  # no call to make, no error
