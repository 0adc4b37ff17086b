"""Optional parts of uniframe, and the one-line error when one is missing.

``pip install uniframe`` stays small on purpose: the model server's three
dependencies and the control plane's. Training the example models and
converting scikit-learn estimators to ONNX need scikit-learn, skl2onnx and
onnx (hundreds of megabytes, never wanted inside an image or on a host that
only runs services), so they are the ``[build]`` extra. Code that needs an
extra imports it lazily and calls :func:`require` first: a user without the
extra reads which one to install, not a ``ModuleNotFoundError`` traceback.

:class:`~uniframe.errors.MissingExtraError` (in the one exception tree, and
importable from here) is a :class:`~uniframe.errors.UniframeError`, so the
CLI prints it as one line and exits 2, and the reconciler reports it as a
failed build like any other, retried: installing the extra cures it.

(``tritonclient``, in ``[dev]``, is used by tests only, which skip without
it; ``psycopg`` is a core dependency, not an extra.)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from uniframe.errors import MissingExtraError

__all__ = ["BUILD", "Extra", "MissingExtraError", "require"]


@dataclass(frozen=True)
class Extra:
    """An optional dependency group of ``pyproject.toml`` and what it makes importable."""

    name: str
    modules: tuple[tuple[str, str], ...]
    """``(import name, pip distribution)`` in the order they are checked: a dependency
    before what imports it, so the message names the package that is really missing."""

    @property
    def install(self) -> str:
        return f"pip install 'uniframe[{self.name}]'"


BUILD = Extra("build", (("sklearn", "scikit-learn"), ("onnx", "onnx"), ("skl2onnx", "skl2onnx")))


def require(what: str, extra: Extra = BUILD) -> None:
    """Import every module of ``extra``, or raise :class:`MissingExtraError` naming it.

    ``what`` is the thing the user asked for, as they would recognise it
    (``uniframe examples iris``). Importing, rather than only looking the
    module up, also catches an install that is present but broken (a
    package whose own dependency is missing); the first call pays the
    import that the caller was about to pay anyway.
    """
    for module, package in extra.modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
            if missing is not None and missing.split(".")[0] == module:
                problem = "is not installed"
            else:
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                problem = f"cannot be imported ({detail})"
            raise MissingExtraError(what, package, extra, problem) from exc
