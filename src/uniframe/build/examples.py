"""Example models trained here, so demos and tests need no model hub."""

from __future__ import annotations

from pathlib import Path

from uniframe.build.sklearn_onnx import convert_estimator
from uniframe.extras import require


def write_iris(directory: Path) -> Path:
    """Train the iris LogisticRegression and write it as ``iris.onnx`` in ``directory``.

    The model takes ``X`` FP32 [-1, 4] and returns ``label`` INT64 [-1] and
    ``probabilities`` FP32 [-1, 3]. Training is deterministic, so the file's
    bytes (and every image digest built from it) are stable.
    """
    require("training the iris example")
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, target = load_iris(return_X_y=True)
    clf = LogisticRegression(max_iter=500, random_state=0)
    clf.fit(features.astype("float32"), target)
    data = convert_estimator(clf, 4)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "iris.onnx"
    out.write_bytes(data)
    return out
