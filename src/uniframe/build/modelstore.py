"""The model registry's files: content-addressed ONNX blobs and one small record per version.

The registry proper (in-use checks, events, the queryable index in the state
store) belongs to the control plane, which the build layer may not import. A
build only needs ``name@version`` -> an ONNX file, so that answer is kept as
plain files any layer can read, written by :class:`uniframe.control.registry.Registry`
alongside its database rows. Layout under ``<data>/models``::

    blobs/sha256/<hex>           the ONNX bytes (pushed as is, or converted from scikit-learn)
    refs/<name>/<version>.json   the version's record (:class:`ModelVersion`)

Blobs are named by their sha256, so identical bytes are stored once and a
blob never changes; files are written to a temporary name and renamed, so a
crash never leaves half a model where a build could read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uniframe.errors import ModelError
from uniframe.paths import data_dir

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SKLEARN_SUFFIXES = (".pkl", ".pickle", ".joblib")


@dataclass(frozen=True)
class ModelVersion:
    """One version of a named model: what it is, how it was made, and where its bytes are.

    ``format`` is ``onnx`` for a pushed ONNX file and ``sklearn->onnx`` for a
    scikit-learn estimator converted at push time; the blob is ONNX either way.
    """

    name: str
    version: str
    sha256: str
    format: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    size: int
    created_at: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def source_format(self) -> str:
        """The format the user pushed (``onnx`` or ``sklearn``), as a spec's ``format`` names it.

        The CLI converts a scikit-learn model before it pushes (the daemon never
        unpickles) and says so in the ``source_format`` metadata.
        """
        declared = self.metadata.get("source_format")
        if declared in ("onnx", "sklearn"):
            return str(declared)
        return self.format.split("->")[0]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelVersion:
        return cls(name=str(data["name"]), version=str(data["version"]),
                   sha256=str(data["sha256"]), format=str(data["format"]),
                   inputs=list(data["inputs"]), outputs=list(data["outputs"]),
                   size=int(data["size"]), created_at=float(data["created_at"]),
                   metadata=dict(data.get("metadata") or {}))


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ModelError(f"{name!r} is not a model name: use letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit")
    return name


def normalize_version(version: int | str) -> str:
    """Versions are text; ``3``, ``"3"`` and ``"03"`` are all version ``"3"``, as ``iris@3`` reads."""
    text = str(version)
    if isinstance(version, bool) or not _NAME.fullmatch(text):
        raise ModelError(f"{version!r} is not a model version: use a whole number (3) or a "
                         "label of letters, digits, '.', '_' and '-' ('2024-05')")
    if text.isdigit():
        if int(text) < 1:
            raise ModelError(f"{version!r} is not a model version: numbered versions start at 1")
        return str(int(text))
    return text


def parse_ref(ref: str) -> tuple[str, str]:
    """``"iris@3"`` -> ``("iris", "3")``, with a message that shows the form on a mistake."""
    name, at, version = ref.rpartition("@")
    if not at or not name or not version:
        raise ModelError(f"{ref!r} is not a model reference: write NAME@VERSION, e.g. iris@1")
    return check_name(name), normalize_version(version)


def describe_onnx(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Load the model with ONNX Runtime and describe its tensors in OIP terms.

    Loading is the check: what ONNX Runtime cannot load, the model server
    could not serve either, so the registry refuses it at push time.
    """
    import onnxruntime as ort

    from uniframe.serve.datatypes import FROM_ONNX

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{path} is not an ONNX model ONNX Runtime can load ({first}); push an .onnx file "
            "(the CLI converts a scikit-learn .pkl or .joblib to ONNX for you)"
        ) from None
    sig: dict[str, list[dict[str, Any]]] = {}
    for role, args in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        sig[role] = []
        for arg in args:
            datatype = FROM_ONNX.get(arg.type)
            if datatype is None:
                raise ModelError(f"{path}: model {role[:-1]} {arg.name!r} has type {arg.type}, "
                                 "which the Open Inference Protocol cannot carry")
            shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
            sig[role].append({"name": arg.name, "datatype": datatype, "shape": shape})
    return sig


@dataclass(frozen=True)
class PreparedModel:
    """A model file made ready to store: its ONNX bytes and what they take and give."""

    data: bytes
    sha256: str
    format: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


def prepare_model(path: Path) -> PreparedModel:
    """Read ``path`` as ONNX and describe it; pickles are refused, never loaded.

    The registry lives in the daemon, which runs as root: unpickling a file
    runs whatever code it carries, so scikit-learn models are converted to
    ONNX by the client that pushes them (``uniframe model push`` does it).
    """
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    if path.suffix.lower() in SKLEARN_SUFFIXES:
        raise ModelError(f"{path}: the registry stores ONNX models only and never loads a "
                         "pickle; `uniframe model push` converts a scikit-learn model to ONNX "
                         "on your side first")
    data, fmt = path.read_bytes(), "onnx"
    sig = describe_onnx(path)
    return PreparedModel(data, hashlib.sha256(data).hexdigest(), fmt, sig["inputs"],
                         sig["outputs"])


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ModelStore:
    """The files under ``<data>/models``; no locking beyond atomic renames is needed.

    Blobs are immutable and named by content, and each record is one file
    replaced whole; the registry in the control plane serializes the decisions
    (which version number, whether a version is in use) through its database.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or data_dir() / "models"

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256

    def _record_path(self, name: str, version: str) -> Path:
        return self.root / "refs" / check_name(name) / f"{normalize_version(version)}.json"

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` under its sha256 (once) and return the hex digest."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if not path.is_file() or path.stat().st_size != len(data):
            _write_atomic(path, data)
        return sha

    def remove_blob(self, sha256: str) -> None:
        self.blob_path(sha256).unlink(missing_ok=True)

    def write_record(self, model: ModelVersion) -> None:
        text = json.dumps(model.to_json(), indent=2, sort_keys=True) + "\n"
        _write_atomic(self._record_path(model.name, model.version), text.encode())

    def read_record(self, name: str, version: str) -> ModelVersion | None:
        path = self._record_path(name, version)
        if not path.is_file():
            return None
        try:
            return ModelVersion.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{path}: damaged model record ({exc}); push the model "
                             "again") from None

    def remove_record(self, name: str, version: str) -> None:
        path = self._record_path(name, version)
        path.unlink(missing_ok=True)
        if path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()

    def records(self) -> list[ModelVersion]:
        refs = self.root / "refs"
        if not refs.is_dir():
            return []
        found = []
        for path in sorted(refs.glob("*/*.json")):
            try:
                record = self.read_record(path.parent.name, path.stem)
            except ModelError:
                continue  # a damaged record is no version; the registry's sync rewrites it
            if record is not None:
                found.append(record)
        return found

    def blobs(self) -> list[str]:
        """The sha256 of every stored blob."""
        root = self.root / "blobs" / "sha256"
        return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) \
            if root.is_dir() else []

    def resolve(self, name: str, version: int | str) -> tuple[ModelVersion, Path]:
        """The record and ONNX file of ``name@version``, checked against its sha256."""
        version = normalize_version(version)
        record = self.read_record(name, version)
        if record is None:
            raise ModelError(f"model {name}@{version} is not in the model registry "
                             f"({self.root}); `uniframe model ls` lists what is, "
                             f"`uniframe model push FILE --name {name}` adds a version",
                             permanent=True)  # apply refuses such a spec: the spec must change
        path = self.blob_path(record.sha256)
        if not path.is_file() or _file_sha256(path) != record.sha256:
            raise ModelError(f"model {record.ref}: its file {path} is missing or damaged; "
                             "remove the version and push the model again")
        return record, path


def new_version(name: str, version: str, prepared: PreparedModel,
                metadata: dict[str, Any] | None = None) -> ModelVersion:
    return ModelVersion(name=name, version=version, sha256=prepared.sha256,
                        format=prepared.format, inputs=prepared.inputs,
                        outputs=prepared.outputs, size=len(prepared.data),
                        created_at=time.time(), metadata=dict(metadata or {}))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
