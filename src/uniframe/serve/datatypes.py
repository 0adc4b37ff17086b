"""The OIP v2 datatypes that ONNX Runtime supports, and their numpy and ONNX names."""

from __future__ import annotations

import numpy as np

# OIP datatype -> numpy dtype. BYTES travels as numpy object arrays (ONNX string tensors).
NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

# ONNX Runtime's type strings (NodeArg.type) -> OIP datatype.
FROM_ONNX: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# numpy dtype kind+size -> OIP datatype, for outputs whose declared type is unknown.
_FROM_NUMPY: dict[np.dtype[np.generic], str] = {v: k for k, v in NUMPY.items()}


def from_numpy(dtype: np.dtype[np.generic]) -> str:
    if dtype.kind in "USO":
        return "BYTES"
    try:
        return _FROM_NUMPY[dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no OIP datatype") from None
