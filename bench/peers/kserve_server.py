"""KServe 0.21 serving iris.onnx over OIP v2 REST: the peer uniframe serve is measured against.

Run inside the KServe venv as ``python kserve_server.py MODEL.onnx NAME PORT``.
Arguments are positional on purpose: ``kserve.model_server`` parses
``sys.argv`` with ``parse_known_args`` at import time, and a flag of ours such
as ``--model`` would be taken as an abbreviation of its ``--model_name``.

The setup is what a careful operator would tune for a fair race: ONNX Runtime
with one intra-op thread and no spinning (as uniframe serve), one uvicorn
worker, no gRPC server, and no per-request logging (latency log lines, the
``kserve.trace`` timing line and uvicorn's access log all off).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse


class OnnxIris(kserve.Model):  # type: ignore[misc]  # kserve ships no type hints
    """Run the ONNX session inline on the event loop, like uniframe serve does."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.session: Any = None
        self.load()

    def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(
            self.path, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return True

    def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None
    ) -> InferResponse:
        features = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        results = self.session.run(self.output_names, {self.input_name: features})
        outputs = []
        for name, arr in zip(self.output_names, results, strict=True):
            out = InferOutput(name=name, shape=list(arr.shape), datatype=_datatype(arr))
            out.set_data_from_numpy(arr, binary_data=False)
            outputs.append(out)
        return InferResponse(
            response_id=payload.id or "", model_name=self.name, infer_outputs=outputs
        )


def _datatype(arr: Any) -> str:
    return {"int64": "INT64", "float32": "FP32"}[arr.dtype.name]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: kserve_server.py MODEL.onnx NAME PORT", file=sys.stderr)
        return 2
    path, name, port = argv[0], argv[1], int(argv[2])
    model = OnnxIris(name, path)
    server = kserve.ModelServer(
        http_port=port,
        workers=1,
        enable_grpc=False,
        enable_docs_url=False,
        enable_latency_logging=False,
        access_log_format=None,
    )
    # ModelServer's constructor configures logging; quiet the per-request loggers after it.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
