"""Decode OIP v2 inference requests into numpy arrays and encode the answers.

JSON tensors may be flat or nested; the binary tensor data extension
(``Inference-Header-Content-Length``) carries raw little-endian tensors after
the JSON header, with BYTES elements prefixed by a 4-byte little-endian
length. Every check names the input and what was expected against what was
given, so a client can fix its request from the error alone.

Memory (see :mod:`uniframe.serve.memory`): nothing here copies a body whole. A
JSON body handed over as a ``bytearray`` is emptied as soon as orjson has parsed
it, its lists are dropped as soon as their array exists, and binary tensors are
numpy views of the body going in and of the result arrays going out, so a large
request peaks at its body plus orjson's parse (or, with binary tensors, its body
plus its outputs), not at several copies of each.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson

from uniframe.serve.datatypes import NUMPY, from_numpy
from uniframe.serve.errors import BadRequest, TooLarge
from uniframe.serve.memory import JSON_COST_FACTOR, LARGE, json_cost
from uniframe.serve.model import OnnxModel, TensorSpec

# numpy kinds accepted, per OIP datatype, when JSON data is decoded ("" accepts any).
_JSON_KINDS = {
    "BOOL": "b",
    "FP16": "iuf",
    "FP32": "iuf",
    "FP64": "iuf",
    "BYTES": "",
}
_INT_KINDS = "iu"
_LEN = struct.Struct("<I")


def _fmt_shape(shape: Any) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


class InferRequest:
    """A decoded request: the feeds for ONNX Runtime and what to send back."""

    __slots__ = ("binary_outputs", "feeds", "id", "outputs")

    def __init__(
        self,
        feeds: dict[str, Any],
        outputs: list[str],
        binary_outputs: set[str],
        request_id: Any,
    ) -> None:
        self.feeds = feeds
        self.outputs = outputs
        self.binary_outputs = binary_outputs
        self.id = request_id


def _check_shape(spec: TensorSpec, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequest(
            f"input {spec.name!r}: shape must be a list of non-negative integers, got {shape!r}"
        )
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    ):
        raise BadRequest(
            f"input {spec.name!r}: shape {_fmt_shape(shape)} given, "
            f"model expects {_fmt_shape(spec.shape)}"
        )
    return tuple(shape)


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _from_json(spec: TensorSpec, inp: dict[str, Any], shape: tuple[int, ...]) -> Any:
    """The array of ``inp``'s ``data``, which is taken out of ``inp`` so it can be freed early."""
    data = inp.pop("data")
    dt = spec.datatype
    want = _count(shape)
    if not isinstance(data, list):
        data = [data]
    if dt == "BYTES":
        return _bytes_from_json(spec, data, shape, want)
    try:
        probe = np.array(data)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"input {spec.name!r}: data is not a regular {dt} array: {exc}") from None
    if probe.size != want:
        raise BadRequest(
            f"input {spec.name!r}: shape {_fmt_shape(shape)} needs {want} elements, "
            f"data has {probe.size}"
        )
    kinds = _JSON_KINDS.get(dt, _INT_KINDS)
    if want and kinds is _INT_KINDS and probe.dtype.kind in "fO":
        # numpy widens a mix of int64 and huge uint64 values to float: settle it exactly.
        return _ints_from_mixed(spec, data, probe, shape)
    if want and probe.dtype.kind not in kinds:
        found = {"f": "non-integer numbers", "U": "strings", "b": "booleans", "O": "mixed values"}
        raise BadRequest(
            f"input {spec.name!r}: {dt} data contains "
            f"{found.get(probe.dtype.kind, probe.dtype.name)}"
        )
    target = NUMPY[dt]
    if probe.dtype == target:
        arr = probe
    elif kinds is _INT_KINDS:
        del probe
        try:  # numpy refuses Python ints out of the target range here, instead of wrapping
            arr = np.array(data, dtype=target)
        except OverflowError as exc:
            raise BadRequest(f"input {spec.name!r}: value out of range for {dt}: {exc}") from None
    else:
        del data  # the lists cost several times the array: free them before the cast
        arr = probe.astype(target)
    return arr.reshape(shape)


def _ints_from_mixed(spec: TensorSpec, data: Any, probe: Any, shape: tuple[int, ...]) -> Any:
    try:
        arr = np.array(data, dtype=NUMPY[spec.datatype])
    except (OverflowError, ValueError, TypeError) as exc:
        raise BadRequest(f"input {spec.name!r}: value out of range for {spec.datatype}: {exc}") from None
    if probe.dtype.kind == "O" or not np.array_equal(arr, probe):
        raise BadRequest(f"input {spec.name!r}: {spec.datatype} data contains non-integer numbers")
    return arr.reshape(shape)


def _bytes_from_json(spec: TensorSpec, data: list[Any], shape: tuple[int, ...], want: int) -> Any:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise BadRequest(
                    f"input {spec.name!r}: BYTES data must be strings, got {type(item).__name__}"
                )
            flat.append(item)
        else:
            stack.pop()
    if len(flat) != want:
        raise BadRequest(
            f"input {spec.name!r}: shape {_fmt_shape(shape)} needs {want} elements, "
            f"data has {len(flat)}"
        )
    arr = np.empty(want, dtype=object)
    arr[:] = flat
    return arr.reshape(shape)


def _from_binary(spec: TensorSpec, raw: memoryview, shape: tuple[int, ...]) -> Any:
    want = _count(shape)
    if spec.datatype == "BYTES":
        items: list[str] = []
        pos, end = 0, len(raw)
        while pos < end:
            if pos + 4 > end:
                raise BadRequest(f"input {spec.name!r}: truncated BYTES element length")
            (n,) = _LEN.unpack_from(raw, pos)
            pos += 4
            if pos + n > end:
                raise BadRequest(f"input {spec.name!r}: BYTES element overruns binary_data_size")
            try:
                items.append(bytes(raw[pos : pos + n]).decode())
            except UnicodeDecodeError:
                raise BadRequest(
                    f"input {spec.name!r}: BYTES element {len(items)} is not UTF-8 "
                    "(ONNX string tensors hold text)"
                ) from None
            pos += n
        if len(items) != want:
            raise BadRequest(
                f"input {spec.name!r}: shape {_fmt_shape(shape)} needs {want} elements, "
                f"binary data has {len(items)}"
            )
        arr = np.empty(want, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dtype = NUMPY[spec.datatype]
    if len(raw) != want * dtype.itemsize:
        raise BadRequest(
            f"input {spec.name!r}: shape {_fmt_shape(shape)} of {spec.datatype} needs "
            f"{want * dtype.itemsize} bytes, binary_data_size is {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def decode(
    model: OnnxModel,
    body: bytes | bytearray,
    header_length: int | None,
    *,
    max_json_cost: int | None = None,
) -> InferRequest:
    """Parse and validate an inference request against ``model``'s inputs and outputs.

    A ``bytearray`` body without binary tensors is consumed: it is emptied once its
    JSON is parsed, so its memory is back before the tensors are built. Binary
    tensors are views of ``body``, which must then stay unchanged until they are used.
    ``max_json_cost`` bounds what parsing a large JSON text is estimated to cost
    (:func:`~uniframe.serve.memory.json_cost`): beyond it the request is refused
    with 413 before anything is parsed.
    """
    binary: memoryview | None = None
    text = body
    if header_length is not None:
        if header_length > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length is {header_length} but the body has "
                f"only {len(body)} bytes"
            )
        binary = memoryview(body)[header_length:]
        text = body[:header_length]
    if max_json_cost is not None and len(text) >= LARGE:
        cost = json_cost(text)
        if cost > max_json_cost:
            raise TooLarge(
                f"this {len(text)}-byte JSON body would take about {cost >> 20} MiB to "
                f"parse, more than the {max_json_cost >> 20} MiB this server allows "
                f"({JSON_COST_FACTOR}x --max-body-size): short numbers and nested lists "
                "cost far more than their text; send large tensors with the binary tensor "
                "data extension (parameters.binary_data_size), which costs no parsing"
            )
    try:
        req = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    del text
    if binary is None and isinstance(body, bytearray):
        body.clear()
    if not isinstance(req, dict):
        raise BadRequest("request body must be a JSON object with an 'inputs' list")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("request needs a non-empty 'inputs' list")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")

    feeds: dict[str, Any] = {}
    cursor = 0
    for i, inp in enumerate(inputs):
        if not isinstance(inp, dict):
            raise BadRequest(f"inputs[{i}] must be an object")
        raw_name = inp.get("name")
        spec = model.input_by_name.get(raw_name) if isinstance(raw_name, str) else None
        if spec is None:
            raise BadRequest(
                f"inputs[{i}]: unknown input {raw_name!r}; model {model.name!r} takes "
                + ", ".join(repr(t.name) for t in model.inputs)
            )
        name = spec.name
        if name in feeds:
            raise BadRequest(f"input {name!r} is given twice")
        datatype = inp.get("datatype")
        if datatype != spec.datatype:
            raise BadRequest(
                f"input {name!r}: datatype {datatype!r} given, model expects {spec.datatype}"
            )
        shape = _check_shape(spec, inp.get("shape"))
        iparams = inp.get("parameters")
        size = iparams.get("binary_data_size") if isinstance(iparams, dict) else None
        if size is not None:
            if binary is None:
                raise BadRequest(
                    f"input {name!r}: binary_data_size given but the request has no "
                    "Inference-Header-Content-Length header"
                )
            if not isinstance(size, int) or size < 0 or cursor + size > len(binary):
                raise BadRequest(
                    f"input {name!r}: binary_data_size {size!r} does not fit the "
                    f"{len(binary) - cursor} binary bytes left"
                )
            feeds[name] = _from_binary(spec, binary[cursor : cursor + size], shape)
            cursor += size
        elif "data" in inp:
            feeds[name] = _from_json(spec, inp, shape)
        else:
            raise BadRequest(f"input {name!r}: needs 'data' or parameters.binary_data_size")
    if len(feeds) != len(model.inputs):
        missing = [t.name for t in model.inputs if t.name not in feeds]
        raise BadRequest(f"missing input(s) {', '.join(map(repr, missing))} for model {model.name!r}")
    if binary is not None and cursor != len(binary):
        raise BadRequest(
            f"{len(binary) - cursor} binary bytes after the last input are not claimed "
            "by any binary_data_size"
        )

    all_binary = params.get("binary_data_output") is True
    requested = req.get("outputs")
    if requested is None:
        names = model.output_names
        binary_outputs = set(names) if all_binary else set()
    else:
        if not isinstance(requested, list) or not requested:
            raise BadRequest("'outputs' must be a non-empty list of {\"name\": ...} objects")
        names, binary_outputs = [], set()
        for j, out in enumerate(requested):
            oname = out.get("name") if isinstance(out, dict) else None
            if oname not in model.output_by_name:
                raise BadRequest(
                    f"outputs[{j}]: unknown output {oname!r}; model {model.name!r} has "
                    + ", ".join(repr(n) for n in model.output_names)
                )
            oparams = out.get("parameters") or {}
            if isinstance(oparams, dict) and oparams.get("classification"):
                raise BadRequest(f"output {oname!r}: the classification extension is not supported")
            flag = oparams.get("binary_data") if isinstance(oparams, dict) else None
            if flag is True or (flag is None and all_binary):
                binary_outputs.add(oname)
            names.append(oname)
    return InferRequest(feeds, names, binary_outputs, req.get("id"))


def _bytes_elements(arr: Any) -> list[Any]:
    return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]


def encode(
    model: OnnxModel, request: InferRequest, results: list[Any]
) -> tuple[bytes, int | None]:
    """Return the response body and, when tensors travel as binary, the JSON header length."""
    head, chunks = encode_parts(model, request, results)
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)


def encode_parts(
    model: OnnxModel, request: InferRequest, results: list[Any]
) -> tuple[bytes, list[bytes | memoryview]]:
    """Like :func:`encode`, with the body in pieces: the JSON, then each binary tensor.

    Binary tensors are byte views of the result arrays, not copies, so a large answer
    can be written to the socket straight from ONNX Runtime's output. The JSON
    header's length is ``len(head)`` when there are binary pieces.
    """
    outputs = []
    chunks: list[bytes | memoryview] = []
    for name, arr in zip(request.outputs, results, strict=True):
        if not isinstance(arr, np.ndarray):
            arr = np.asarray(arr)
        datatype = from_numpy(arr.dtype)
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if name in request.binary_outputs:
            raw: bytes | memoryview
            if datatype == "BYTES":
                raw = b"".join(
                    _LEN.pack(len(b)) + b for b in (s.encode() for s in _bytes_elements(arr))
                )
            else:
                flat = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).reshape(-1)
                raw = flat.view(np.uint8).data
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            out["data"] = _bytes_elements(arr)
        else:
            out["data"] = np.ascontiguousarray(arr).reshape(-1)
        outputs.append(out)
    resp: dict[str, Any] = {
        "model_name": model.name,
        "model_version": model.version,
        "outputs": outputs,
    }
    if request.id is not None:
        resp["id"] = request.id
    return orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY), chunks
