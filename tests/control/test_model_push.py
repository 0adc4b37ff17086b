"""``uniframe model push FILE.pkl`` converts the pickle on the user's side and sends ONNX.

The daemon runs as root and must never unpickle (that runs the file's code),
so the CLI converts scikit-learn pickles in its own process and pushes the
ONNX bytes with ``format=onnx``. Checked here against a real daemon: what
the request carried (seen on the client's HTTP transport), and what the
registry then holds (ONNX that answers like the estimator, marked as
converted from scikit-learn).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import onnxruntime as ort
import pytest
from control_helpers import LiveDaemon
from typer.testing import CliRunner, Result

import uniframe.cli.main  # noqa: F401  (registers every command)
from uniframe.build.sklearn_onnx import convert_pickle
from uniframe.cli.app import app


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    """Every request the CLI's HTTP client sends (a spy on httpx's own transport call)."""
    requests: list[httpx.Request] = []
    real_send = httpx.Client.send

    def send(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        requests.append(request)
        return real_send(self, request, **kwargs)

    monkeypatch.setattr(httpx.Client, "send", send)
    return requests


@pytest.mark.parametrize("suffix", [".pkl", ".joblib"])
def test_a_pickle_is_converted_here_and_pushed_as_onnx(
        live: LiveDaemon, sent: list[httpx.Request], tmp_path: Path, suffix: str) -> None:
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    features, target = load_iris(return_X_y=True)
    tree = DecisionTreeClassifier(max_depth=3, random_state=0).fit(features, target)
    file = tmp_path / f"tree{suffix}"
    if suffix == ".joblib":
        joblib.dump(tree, file)
    else:
        file.write_bytes(pickle.dumps(tree))

    pushed = cli("model", "push", str(file), "--name", "tree", "--meta", "team=ml")
    assert pushed.exit_code == 0, pushed.output
    assert pushed.stdout.startswith("pushed tree@1  (onnx, ")

    [upload] = [r for r in sent if r.method == "POST" and r.url.path == "/v1/models"]
    assert upload.url.params.get_list("format") == ["onnx"]
    assert sorted(upload.url.params.get_list("meta")) == ["source_format=sklearn", "team=ml"]

    shown = json.loads(cli("model", "inspect", "tree@1", "-o", "json").stdout)
    assert shown["format"] == "onnx"
    assert shown["metadata"] == {"source_format": "sklearn", "team": "ml"}
    assert shown["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    # the registry holds this process's conversion of the file, byte for byte ...
    stored = Path(shown["path"]).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == shown["sha256"]
    assert stored == convert_pickle(file)
    # ... and it answers like the estimator does
    session = ort.InferenceSession(shown["path"], providers=["CPUExecutionProvider"])
    labels = session.run(["label"], {"X": features.astype(np.float32)})[0]
    assert labels.tolist() == tree.predict(features).tolist()


def test_a_file_that_is_not_a_pickle_is_refused_before_anything_is_sent(
        live: LiveDaemon, sent: list[httpx.Request], tmp_path: Path) -> None:
    junk = tmp_path / "model.pkl"
    junk.write_text("not a pickle")
    result = cli("model", "push", str(junk), "--name", "junk")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {junk}: cannot load the estimator: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert sent == []
