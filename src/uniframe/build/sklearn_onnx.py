"""Convert scikit-learn estimators to ONNX at build time.

The model server only ever loads ONNX: scikit-learn, skl2onnx and their
dependencies weigh hundreds of megabytes and must never end up inside an
image. Conversion therefore happens here, on the build host, or in the CLI of
the user who pushes a pickle (never in the daemon: unpickling runs the file's
code, so it happens with the trust of whoever owns the file). These packages
are the ``[build]`` extra; without it every entry point here says so in one
line (:func:`uniframe.extras.require`).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from uniframe.errors import ModelError
from uniframe.extras import require


def convert_estimator(estimator: Any, n_features: int, *, input_name: str = "X") -> bytes:
    """Return the ONNX bytes for a fitted estimator taking FP32 rows of ``n_features``.

    Classifiers get plain tensor outputs (``zipmap`` off): a sequence of maps
    cannot travel over the Open Inference Protocol.
    """
    require("converting a scikit-learn model to ONNX")
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options: dict[Any, Any] = {}
    if hasattr(estimator, "predict_proba"):
        options = {id(estimator): {"zipmap": False}}
    try:
        onx = to_onnx(
            estimator,
            initial_types=[(input_name, FloatTensorType([None, n_features]))],
            options=options,
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
    except Exception as exc:
        raise ModelError(f"skl2onnx cannot convert {type(estimator).__name__}: {exc}") from exc
    data: bytes = onx.SerializeToString()
    return data


def convert_pickle(path: Path, n_features: int | None = None) -> bytes:
    """Load a pickled or joblib-dumped estimator and convert it.

    The feature count defaults to the estimator's own ``n_features_in_``.
    Unpickling runs code from the file: only convert models you trust.
    """
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    # before unpickling: without scikit-learn, loading would fail on the estimator's classes
    require(f"converting {path.name} (scikit-learn) to ONNX")
    try:
        if path.suffix.lower() == ".joblib":
            import joblib

            estimator = joblib.load(path)
        else:
            with path.open("rb") as fh:
                estimator = pickle.load(fh)
    except Exception as exc:
        raise ModelError(f"{path}: cannot load the estimator: {exc}") from exc
    if n_features is None:
        n_features = getattr(estimator, "n_features_in_", None)
        if not isinstance(n_features, int):
            raise ModelError(f"{path}: the estimator does not say how many features it takes")
    return convert_estimator(estimator, n_features)
