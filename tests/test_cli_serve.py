"""The front door end to end: ``uniframe examples``, ``uniframe serve`` and ``uniframe infer``."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_examples_serve_infer(tmp_path: Path) -> None:
    out = subprocess.run(["uniframe", "examples", "iris", str(tmp_path)], capture_output=True, text=True, check=True)
    assert "iris.onnx" in out.stdout
    port = _free_port()
    proc = subprocess.Popen(["uniframe", "serve", str(tmp_path / "iris.onnx"), "--host", "127.0.0.1",
                             "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        assert "(ready)" in proc.stderr.readline()
        res = subprocess.run(["uniframe", "infer", f"http://127.0.0.1:{port}", "iris", "-o", "json",
                              "-d", "[[5.1,3.5,1.4,0.2],[6.7,3.0,5.2,2.3]]"],
                             capture_output=True, text=True, check=True)
        assert re.search(r'"data":\s*\[\s*0,\s*2\s*\]', res.stdout), res.stdout
        res = subprocess.run(["uniframe", "infer", f"http://127.0.0.1:{port}", "iris", "-d", "[[1,2,3]]"],
                             capture_output=True, text=True)
        assert res.returncode == 2
        assert "shape [1,3] given, model expects [-1,4]" in res.stderr
        assert "Traceback" not in res.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_serve_refuses_pickles_with_advice(tmp_path: Path) -> None:
    pkl = tmp_path / "m.pkl"
    pkl.write_bytes(b"")
    res = subprocess.run(["uniframe", "serve", str(pkl)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "uniframe convert" in res.stderr


@pytest.mark.slow
def test_convert_sklearn_pickle(tmp_path: Path) -> None:
    import pickle

    import numpy as np
    import onnxruntime as ort
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    x, y = load_iris(return_X_y=True)
    clf = DecisionTreeClassifier(random_state=0).fit(x, y)
    (tmp_path / "tree.pkl").write_bytes(pickle.dumps(clf))
    subprocess.run(["uniframe", "convert", str(tmp_path / "tree.pkl"), "-o", str(tmp_path / "tree.onnx")],
                   check=True, capture_output=True, env={**os.environ})
    sess = ort.InferenceSession(str(tmp_path / "tree.onnx"))
    labels = sess.run(None, {"X": x[:5].astype(np.float32)})[0]
    assert labels.tolist() == clf.predict(x[:5]).tolist()
