"""The Open Inference Protocol (v2) model server that ships inside every image.

Everything this package imports ends up in every unikernel, so it depends on
numpy, onnxruntime and orjson only: no web framework, no pydantic, no asyncio.
It runs one epoll loop in one thread (see :mod:`uniframe.serve.http`); scale
out with replicas, which the control plane manages.

Run it with ``python -m uniframe.serve MODEL.onnx`` or ``uniframe serve``.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
