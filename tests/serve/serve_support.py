"""Fixtures for the model server: real models, a real server process, a real HTTP client."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from uniframe.build.examples import write_iris

# OIP datatype -> ONNX TensorProto element type name.
ONNX_TYPES = {
    "BOOL": "BOOL", "INT8": "INT8", "INT16": "INT16", "INT32": "INT32", "INT64": "INT64",
    "UINT8": "UINT8", "UINT16": "UINT16", "UINT32": "UINT32", "UINT64": "UINT64",
    "FP16": "FLOAT16", "FP32": "FLOAT", "FP64": "DOUBLE", "BYTES": "STRING",
}


def write_identity(path: Path, datatype: str) -> Path:
    """An ONNX model ``y = Identity(x)`` over a dynamic 2-D tensor of ``datatype``."""
    from onnx import TensorProto, helper, save

    elem = getattr(TensorProto, ONNX_TYPES[datatype])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("x", elem, ["n", "m"])],
        [helper.make_tensor_value_info("y", elem, ["n", "m"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


def write_two_inputs(path: Path) -> Path:
    """``sum = a + b`` and ``diff = a - b`` over FP32 [-1, 2]: several inputs and outputs."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Sub", ["a", "b"], ["diff"])],
        "two_inputs",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 2]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 2]) for n in ("sum", "diff")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    write_iris(d)
    write_two_inputs(d / "two.onnx")
    for dt in ONNX_TYPES:
        write_identity(d / f"id_{dt.lower()}.onnx", dt)
    return d


@dataclass
class RunningServer:
    proc: subprocess.Popen[str]
    port: int
    url: str
    client: httpx.Client

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_server(args: list[str], timeout: float = 30.0) -> tuple[subprocess.Popen[str], int]:
    """Start ``python -m uniframe.serve`` on a free port and wait for its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "uniframe.serve", "--host", "127.0.0.1", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"on http://[^:]+:(\d+) \(ready\)", line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise AssertionError("server did not become ready:\n" + "".join(lines))


def stop_server(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("server did not stop on SIGTERM") from None
    return proc.returncode


@pytest.fixture(scope="session")
def server(model_dir: Path) -> Iterator[RunningServer]:
    models = [f"iris={model_dir / 'iris.onnx'}", f"iris@2={model_dir / 'iris.onnx'}",
              f"two={model_dir / 'two.onnx'}"]
    models += [f"id_{dt.lower()}={model_dir / f'id_{dt.lower()}.onnx'}" for dt in ONNX_TYPES]
    proc, port = start_server([*models, "--max-body-size", "1Mi"])
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=10) as client:
        yield RunningServer(proc, port, url, client)
    assert stop_server(proc) == 0


IRIS_BODY = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}


def assert_healthy(srv: RunningServer) -> None:
    """The server still answers a valid inference correctly."""
    assert srv.alive()
    r = srv.client.post("/v2/models/iris/infer", json=IRIS_BODY)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [0]
