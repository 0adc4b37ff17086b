"""Small pure functions of the model server."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from uniframe.serve.__main__ import _size, parse_model_arg
from uniframe.serve.metrics import Metrics


def test_model_argument_forms() -> None:
    assert parse_model_arg("/m/iris.onnx", None, "1") == ("iris", "1", Path("/m/iris.onnx"))
    assert parse_model_arg("/m/iris.onnx", "flower", "3") == ("flower", "3", Path("/m/iris.onnx"))
    assert parse_model_arg("iris@7=/m/a.onnx", None, "1") == ("iris", "7", Path("/m/a.onnx"))
    assert parse_model_arg("iris=/m/a.onnx", None, "1") == ("iris", "1", Path("/m/a.onnx"))


def test_sizes() -> None:
    assert _size("64Mi") == 64 << 20
    assert _size("512k") == 512 << 10
    assert _size("1000") == 1000
    with pytest.raises(argparse.ArgumentTypeError, match="is not a size"):
        _size("lots")


def test_metrics_escape_labels_and_count_buckets() -> None:
    m = Metrics()
    m.record('we"ird\\name', "1", 200, 0.0003)
    m.record('we"ird\\name', "1", 200, 7.0)
    text = m.render().decode()
    assert 'model="we\\"ird\\\\name"' in text
    assert 'le="0.0005"} 1' in text
    assert 'le="+Inf"} 2' in text
    assert '_count{model="we\\"ird\\\\name",version="1"} 2' in text
