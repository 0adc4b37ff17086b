"""Turn a spec's model reference into one ONNX file the image can carry.

scikit-learn models are converted here, on the build host, so images carry
ONNX only. Registry models (``name@version``) are read from the registry's
files (:mod:`uniframe.build.modelstore`), which the control plane's registry
writes: the build layer never needs the control plane to find a model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from uniframe.build.modelstore import ModelStore
from uniframe.build.sklearn_onnx import convert_pickle
from uniframe.errors import BuildError, ModelError
from uniframe.spec import FileModel, InferenceService, RegistryModel


@dataclass(frozen=True)
class ResolvedModel:
    """The ONNX file to ship, and the name and version the server announces."""

    name: str
    version: str
    path: Path
    sha256: str
    source: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resolve_model(service: InferenceService, workdir: Path) -> ResolvedModel:
    """The ONNX model for ``service``; converted files are written into ``workdir``."""
    ref = service.spec.model
    name = service.metadata.name
    if isinstance(ref, RegistryModel):
        return _resolve_registry(ref, name)
    assert isinstance(ref, FileModel)
    path = Path(ref.uri)
    if not path.is_file():
        raise BuildError(f"spec.model.uri: {path} does not exist; write the model file first")
    if ref.format == "sklearn":
        try:
            data = convert_pickle(path)
        except ModelError as exc:
            raise BuildError(f"spec.model.uri: {exc}") from None
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / f"{name}.onnx"
        out.write_bytes(data)
        return ResolvedModel(name, "1", out, _sha256(out), f"{path} (scikit-learn, converted)")
    _check_onnx(path)
    return ResolvedModel(name, "1", path, _sha256(path), str(path))


def _resolve_registry(ref: RegistryModel, name: str) -> ResolvedModel:
    """The registry's file for ``ref``; the server announces the registry's version."""
    try:
        record, path = ModelStore().resolve(ref.name, ref.version)
    except ModelError as exc:
        raise BuildError(f"spec.model: {exc}", permanent=exc.permanent) from None
    if ref.format is not None and ref.format != record.source_format:
        raise BuildError(
            f"spec.model: {record.ref} was pushed as {record.source_format}, but the spec insists "
            f"on format {ref.format}; fix the spec's format or push the other file",
            permanent=True,
        )
    return ResolvedModel(name, record.version, path, record.sha256,
                         f"registry {record.ref} ({record.format})")


def _check_onnx(path: Path) -> None:
    """Fail the build early, with the runtime's own words, if ONNX Runtime cannot load it."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BuildError(f"spec.model.uri: {path} is not a model ONNX Runtime can load: {first}") from None
