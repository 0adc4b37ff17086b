"""An ONNX model behind ONNX Runtime, described in OIP terms.

Sessions are created once at start-up with one intra-op thread by default:
a replica serves many small requests from one event loop, and a thread pool
that spins between requests costs more than it gives. Scale with replicas,
or raise ``threads`` for large models.

ONNX Runtime's CPU memory arena is off: the arena never returns what it
grew to, so one large request would pin its tensors' size in the replica for
good; plain malloc gives it back (see :func:`uniframe.serve.http.give_back_memory`)
and measured no slower on small requests (bench/README.md, "Memory").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniframe.serve.datatypes import FROM_ONNX
from uniframe.serve.errors import BadRequest, InferenceFailed, ModelLoadError


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, OIP datatype and shape (-1 for a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (shape or []))


class OnnxModel:
    """A loaded model: its metadata and a ``run`` that maps input arrays to outputs."""

    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, name: str, version: str = "1", *, threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = path
        self.name = name
        self.version = version
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such model file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                os.fspath(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
        self.inputs = tuple(self._spec(a, "input") for a in self._session.get_inputs())
        self.outputs = tuple(self._spec(a, "output") for a in self._session.get_outputs())
        self.input_by_name = {t.name: t for t in self.inputs}
        self.output_by_name = {t.name: t for t in self.outputs}
        self.output_names = [t.name for t in self.outputs]
        self._run = self._session.run

    def _spec(self, arg: Any, role: str) -> TensorSpec:
        datatype = FROM_ONNX.get(arg.type)
        if datatype is None:
            hint = (
                " (scikit-learn classifiers: convert with zipmap=False)"
                if "map" in arg.type or "seq" in arg.type
                else ""
            )
            raise ModelLoadError(
                f"{self.path}: {role} {arg.name!r} has type {arg.type}, which the Open "
                f"Inference Protocol cannot carry{hint}"
            )
        return TensorSpec(arg.name, datatype, _dims(arg.shape))

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }

    def run(self, feeds: dict[str, np.ndarray[Any, Any]], outputs: list[str]) -> list[Any]:
        """Run the session; errors on already validated input are the runtime's own."""
        try:
            result: list[Any] = self._run(outputs, feeds)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            # ORT reports shape and value problems it found in the graph as INVALID_ARGUMENT.
            if "INVALID_ARGUMENT" in msg or "Invalid" in msg:
                raise BadRequest(f"model {self.name!r} rejected the input: {msg}") from None
            raise InferenceFailed(f"model {self.name!r} failed: {msg}") from None
        return result
