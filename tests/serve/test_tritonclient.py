"""A client we did not write, tritonclient[http], against ``uniframe serve``."""

from __future__ import annotations

import numpy as np
import pytest
from serve_support import RunningServer

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


@pytest.fixture
def client(server: RunningServer):  # type: ignore[no-untyped-def]
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield c
    c.close()


def test_health_and_metadata(client) -> None:  # type: ignore[no-untyped-def]
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("iris")
    assert client.is_model_ready("iris", model_version="1")
    meta = client.get_model_metadata("iris")
    assert meta["inputs"][0]["name"] == "X"
    assert client.get_server_metadata()["name"] == "uniframe"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer(client, binary: bool) -> None:  # type: ignore[no-untyped-def]
    inp = httpclient.InferInput("X", list(ROWS.shape), "FP32")
    inp.set_data_from_numpy(ROWS, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("label", binary_data=binary),
               httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
    result = client.infer("iris", [inp], outputs=outputs, request_id="t1", model_version="1")
    assert result.as_numpy("label").tolist() == [0, 2]
    probs = result.as_numpy("probabilities")
    assert probs.shape == (2, 3) and probs.dtype == np.float32
    assert probs[0, 0] > 0.9 and probs[1, 2] > 0.9
    assert result.get_response()["id"] == "t1"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_bytes_and_fp16_roundtrip(client, binary: bool) -> None:  # type: ignore[no-untyped-def]
    words = np.array([[b"alpha", b"beta"], [b"", b"\xc3\xa9t\xc3\xa9"]], dtype=np.object_)
    inp = httpclient.InferInput("x", [2, 2], "BYTES")
    inp.set_data_from_numpy(words, binary_data=binary)
    res = client.infer("id_bytes", [inp], outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)])
    got = res.as_numpy("y")
    assert [x if isinstance(x, bytes) else x.encode() for x in got.reshape(-1)] == list(words.reshape(-1))

    half = np.array([[0.5, -1.25], [3.0, 65504.0]], dtype=np.float16)
    inp = httpclient.InferInput("x", [2, 2], "FP16")
    inp.set_data_from_numpy(half, binary_data=binary)
    res = client.infer("id_fp16", [inp], outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)])
    assert np.array_equal(res.as_numpy("y"), half)


def test_errors_surface_as_exceptions(client) -> None:  # type: ignore[no-untyped-def]
    inp = httpclient.InferInput("X", [1, 3], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32), binary_data=True)
    with pytest.raises(InferenceServerException, match=r"shape \[1,3\] given, model expects \[-1,4\]"):
        client.infer("iris", [inp])
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")
