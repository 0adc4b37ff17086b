"""The OIP v2 protocol end to end over real HTTP against ``python -m uniframe.serve``."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from serve_support import IRIS_BODY, ONNX_TYPES, RunningServer

SAMPLES: dict[str, list[list[Any]]] = {
    "BOOL": [[True, False, True], [False, False, True]],
    "INT8": [[-128, 0, 127], [1, -1, 5]],
    "INT16": [[-32768, 0, 32767], [1, -1, 5]],
    "INT32": [[-(2**31), 0, 2**31 - 1], [1, -1, 5]],
    "INT64": [[-(2**63), 0, 2**63 - 1], [1, -1, 5]],
    "UINT8": [[0, 1, 255], [2, 3, 4]],
    "UINT16": [[0, 1, 65535], [2, 3, 4]],
    "UINT32": [[0, 1, 2**32 - 1], [2, 3, 4]],
    "UINT64": [[0, 1, 2**64 - 1], [2, 3, 4]],
    "FP16": [[0.5, -2.0, 65504.0], [0.25, 1.0, -0.125]],
    "FP32": [[0.5, -2.25, 3.0e38], [1.5, 1e-3, -7.0]],
    "FP64": [[0.1, -2.25, 1.0e308], [1.5, 1e-300, -7.0]],
    "BYTES": [["a", "héllo", ""], ["x y", "\"q\"", "123"]],
}


# --- health and metadata --------------------------------------------------------------------


def test_health_and_server_metadata(server: RunningServer) -> None:
    c = server.client
    assert c.get("/v2/health/live").status_code == 200
    assert c.get("/v2/health/ready").status_code == 200
    meta = c.get("/v2").json()
    assert meta["name"] == "uniframe"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_versions(server: RunningServer) -> None:
    c = server.client
    meta = c.get("/v2/models/iris").json()
    assert meta["name"] == "iris"
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]
    assert meta["versions"] == ["2"]  # the unversioned path is the latest version
    assert c.get("/v2/models/iris/versions/1").json()["versions"] == ["1"]
    assert c.get("/v2/models/iris/ready").status_code == 200
    assert c.get("/v2/models/iris/versions/1/ready").json() == {"name": "iris", "ready": True}


# --- inference ---------------------------------------------------------------------------------


def test_iris_flat_and_nested_data_agree(server: RunningServer) -> None:
    rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    flat = {"inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32",
                        "data": [v for r in rows for v in r]}]}
    nested = {"inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32", "data": rows}]}
    a = server.client.post("/v2/models/iris/infer", json=flat).json()
    b = server.client.post("/v2/models/iris/infer", json=nested).json()
    assert a == b
    label, probs = a["outputs"]
    assert label == {"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 2]}
    assert probs["shape"] == [2, 3]
    assert probs["data"][0] > 0.9 and probs["data"][5] > 0.9
    assert a["model_name"] == "iris" and a["model_version"] == "2"


def test_request_id_is_echoed_and_versioned_path(server: RunningServer) -> None:
    body = {**IRIS_BODY, "id": "req-42"}
    r = server.client.post("/v2/models/iris/versions/1/infer", json=body).json()
    assert r["id"] == "req-42"
    assert r["model_version"] == "1"
    r2 = server.client.post("/v2/models/iris/infer", json=IRIS_BODY).json()
    assert "id" not in r2


def test_outputs_filter(server: RunningServer) -> None:
    body = {**IRIS_BODY, "outputs": [{"name": "probabilities"}]}
    r = server.client.post("/v2/models/iris/infer", json=body).json()
    assert [o["name"] for o in r["outputs"]] == ["probabilities"]


def test_several_inputs_and_outputs(server: RunningServer) -> None:
    body = {"inputs": [
        {"name": "b", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
        {"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [10, 20]},
    ], "outputs": [{"name": "diff"}, {"name": "sum"}]}
    r = server.client.post("/v2/models/two/infer", json=body).json()
    assert [(o["name"], o["data"]) for o in r["outputs"]] == [("diff", [9.0, 18.0]), ("sum", [11.0, 22.0])]


@pytest.mark.parametrize("datatype", list(ONNX_TYPES))
def test_every_datatype_json(server: RunningServer, datatype: str) -> None:
    rows = SAMPLES[datatype]
    body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": datatype, "data": rows}]}
    r = server.client.post(f"/v2/models/id_{datatype.lower()}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["datatype"] == datatype
    assert out["shape"] == [2, 3]
    if datatype in ("FP16", "FP32"):
        # the server prints the shortest decimal that reads back as the same float32/16
        dt = np.float16 if datatype == "FP16" else np.float32
        assert np.array_equal(np.array(out["data"], dtype=dt), np.array(rows, dtype=dt).reshape(-1))
    else:
        assert out["data"] == [v for row in rows for v in row]


def _binary_body(header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    import orjson

    head = orjson.dumps(header)
    return head + b"".join(blobs), {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def _split_binary(resp_body: bytes, header_len: int) -> tuple[dict[str, Any], bytes]:
    import orjson

    return orjson.loads(resp_body[:header_len]), resp_body[header_len:]


def _bytes_blob(items: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in items)


@pytest.mark.parametrize("datatype", list(ONNX_TYPES))
def test_every_datatype_binary_both_ways(server: RunningServer, datatype: str) -> None:
    from uniframe.serve.datatypes import NUMPY

    rows = SAMPLES[datatype]
    if datatype == "BYTES":
        blob = _bytes_blob([v for r in rows for v in r])
    else:
        blob = np.array(rows, dtype=NUMPY[datatype]).astype(NUMPY[datatype].newbyteorder("<")).tobytes()
    header = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": datatype,
                          "parameters": {"binary_data_size": len(blob)}}],
              "parameters": {"binary_data_output": True}}
    body, headers = _binary_body(header, [blob])
    r = server.client.post(f"/v2/models/id_{datatype.lower()}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    hlen = int(r.headers["Inference-Header-Content-Length"])
    meta, raw = _split_binary(r.content, hlen)
    out = meta["outputs"][0]
    assert "data" not in out
    assert out["parameters"]["binary_data_size"] == len(raw) == len(blob)
    assert raw == blob  # identity model: the same bytes come back


def test_binary_input_json_output_and_per_output_flag(server: RunningServer) -> None:
    x = np.array([[5.1, 3.5, 1.4, 0.2]], dtype="<f4").tobytes()
    header = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                          "parameters": {"binary_data_size": len(x)}}],
              "outputs": [{"name": "label", "parameters": {"binary_data": False}},
                          {"name": "probabilities", "parameters": {"binary_data": True}}]}
    body, headers = _binary_body(header, [x])
    r = server.client.post("/v2/models/iris/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    meta, raw = _split_binary(r.content, int(r.headers["Inference-Header-Content-Length"]))
    label, probs = meta["outputs"]
    assert label["data"] == [0]
    assert probs["parameters"]["binary_data_size"] == 12 == len(raw)
    assert np.frombuffer(raw, "<f4")[0] > 0.9


def test_json_only_response_has_no_binary_header(server: RunningServer) -> None:
    r = server.client.post("/v2/models/iris/infer", json=IRIS_BODY)
    assert "inference-header-content-length" not in r.headers
    assert r.headers["content-type"] == "application/json"
