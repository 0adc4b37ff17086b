"""Lay out an MLServer 1.7.1 model repository serving the iris classifier with mlserver-sklearn.

Run inside the MLServer venv as ``python mlserver_model.py DIR NAME HTTP_PORT GRPC_PORT``,
then ``mlserver start DIR``. It trains here rather than copying a pickle: joblib
files are tied to the scikit-learn version that wrote them, and this venv's
scikit-learn is the one that will load it. The estimator is the one behind
``uniframe examples iris`` (same data, solver settings and seed).

Settings chosen for a fair, quiet race: one process (``parallel_workers: 0``
runs inference in the server process instead of a worker pool), no metrics
server (``metrics_endpoint: null``), no access log (``debug: false``).
MLServer 1.7.1 always starts its gRPC server; it gets a free port and stays idle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: mlserver_model.py DIR NAME HTTP_PORT GRPC_PORT", file=sys.stderr)
        return 2
    root, name, http_port, grpc_port = Path(argv[0]), argv[1], int(argv[2]), int(argv[3])
    features, target = load_iris(return_X_y=True)
    clf = LogisticRegression(max_iter=500, random_state=0)
    clf.fit(features.astype("float32"), target)

    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(clf, model_dir / "model.joblib")
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": name,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "1"},
    }, indent=2))
    (root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "parallel_workers": 0,
        "metrics_endpoint": None,
        "debug": False,
        "load_models_at_startup": True,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
