"""The model registry: named, versioned ONNX models that specs pin as ``name@version``.

Two halves, because the build layer must resolve models without importing the
control plane:

- the files (content-addressed blobs and one JSON record per version) belong
  to :mod:`uniframe.build.modelstore`, which ``uniframe build`` reads;
- the index (the ``models`` table), the events and the rule that a version in
  use by an applied spec cannot be removed live here, on the state store.

Writes keep the two in step: a version's record file is written inside the
transaction that inserts its row (and removed again if that transaction
fails), and removed right after the transaction that deletes the row.
:meth:`Registry.sync` repairs what a crash between the two left behind, and
runs whenever a registry is opened.

Blob deletion races a concurrent push of the same bytes; both take the lock
``model-blob:<sha256>`` in their transaction, and the push re-creates the blob
inside it if it vanished, so a committed version always has its bytes.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniframe.build.modelstore import (
    ModelStore,
    ModelVersion,
    check_name,
    new_version,
    normalize_version,
    parse_ref,
    prepare_model,
)
from uniframe.control.store import ModelRecord, Store, Tx
from uniframe.errors import ConflictError, ModelError, NotFoundError

MODEL_EVENT_KIND = "Model"
"""Registry events are filed under object kind ``Model`` and the model's name."""


def _row(model: ModelVersion) -> ModelRecord:
    """The store's index row for a version (the store keeps its own record, free of build)."""
    return ModelRecord(name=model.name, version=model.version, sha256=model.sha256,
                       format=model.format, inputs=model.inputs, outputs=model.outputs,
                       size=model.size, created_at=model.created_at, metadata=model.metadata)


def _version(row: ModelRecord) -> ModelVersion:
    return ModelVersion(name=row.name, version=row.version, sha256=row.sha256, format=row.format,
                        inputs=row.inputs, outputs=row.outputs, size=row.size,
                        created_at=row.created_at, metadata=row.metadata)


def _versions(tx: Tx, name: str | None = None) -> builtins.list[ModelVersion]:
    return [_version(row) for row in tx.list_models(name)]


@dataclass(frozen=True)
class Pushed:
    """The outcome of a push: the version, and False when identical bytes were already there."""

    model: ModelVersion
    created: bool


def model_ref_of(spec: dict[str, Any]) -> tuple[str, str] | None:
    """The ``(name, version)`` a stored InferenceService pins, or None for a file model.

    Accepts the whole applied document (``{"spec": {"model": ...}}``) or just its
    ``spec``, and the model as ``"iris@3"`` or ``{name: iris, version: 3}``.
    """
    body = spec.get("spec", spec)
    model = body.get("model") if isinstance(body, dict) else None
    try:
        if isinstance(model, str) and "@" in model:
            return parse_ref(model)
        if isinstance(model, dict) and "name" in model and "version" in model:
            return str(model["name"]), normalize_version(model["version"])
    except ModelError:
        return None
    return None


def _blob_lock(sha256: str) -> str:
    return f"model-blob:{sha256}"


def _version_lock(name: str, version: str) -> str:
    return f"model:{name}@{version}"


def _next_version(versions: builtins.list[ModelVersion]) -> str:
    numbers = [int(m.version) for m in versions if m.version.isdigit()]
    return str(max(numbers, default=0) + 1)


class Registry:
    """Push, list, inspect, resolve and remove model versions."""

    def __init__(self, store: Store, files: ModelStore | None = None) -> None:
        self.store = store
        self.files = files or ModelStore()
        self._owns_store = False

    @classmethod
    def open(cls, target: str | Path | None = None, *, root: Path | None = None) -> Registry:
        """A registry on the store at ``target`` (see :meth:`Store.open`), synced with its files."""
        registry = cls(Store.open(target), ModelStore(root))
        registry._owns_store = True
        registry.sync()
        return registry

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads -----------------------------------------------------------------------------

    def list(self, name: str | None = None) -> builtins.list[ModelVersion]:
        """Every version, by name and then in the order they were pushed."""
        with self.store.tx(readonly=True) as tx:
            return _versions(tx, name)

    def inspect(self, name: str, version: int | str) -> ModelVersion:
        version = normalize_version(version)
        with self.store.tx(readonly=True) as tx:
            return self._get(tx, name, version)

    def resolve(self, ref: str) -> Path:
        """``"iris@3"`` -> the ONNX file, verified against its sha256."""
        name, version = parse_ref(ref)
        self.inspect(name, version)  # the index decides what exists
        try:
            return self.files.resolve(name, version)[1]
        except ModelError:
            self.sync()  # a crash may have left the record behind; rebuild it from the index
            return self.files.resolve(name, version)[1]

    def users(self, name: str, version: int | str, tx: Tx | None = None) -> builtins.list[str]:
        """The live objects whose spec pins ``name@version``, as ``Kind/name``."""
        version = normalize_version(version)
        if tx is None:
            with self.store.tx(readonly=True) as own:
                return self.users(name, version, own)
        return [obj.ref for obj in tx.list_objects("InferenceService")
                if model_ref_of(obj.spec) == (name, version)]

    def require(self, tx: Tx, name: str, version: int | str) -> ModelVersion:
        """For the daemon's apply: check ``name@version`` exists and keep it until ``tx`` ends.

        The lock makes a concurrent :meth:`remove` wait for this transaction,
        and then see the object that now uses the version.
        """
        version = normalize_version(version)
        tx.lock(_version_lock(name, version))
        return self._get(tx, name, version)

    def _get(self, tx: Tx, name: str, version: str) -> ModelVersion:
        row = tx.get_model(name, version)
        if row is None:
            others = ", ".join(m.version for m in tx.list_models(name))
            hint = (f"versions of {name}: {others}" if others
                    else f"push it with `uniframe model push FILE --name {name}`")
            raise NotFoundError(f"model {name}@{version} is not in the registry; {hint}")
        return _version(row)

    # -- writes ----------------------------------------------------------------------------

    def push(self, file: Path, name: str, *, version: int | str | None = None,
             metadata: dict[str, Any] | None = None) -> Pushed:
        """Store ``file`` (ONNX, or a scikit-learn pickle converted now) as a version of ``name``.

        Without ``version`` the next whole number is taken, unless the newest
        version with these exact bytes already exists: then that one is
        returned (``created=False``). An explicit version that exists with
        other bytes is refused: versions never change.
        """
        check_name(name)
        wanted = normalize_version(version) if version is not None else None
        prepared = prepare_model(Path(file))
        self.files.put_blob(prepared.data)  # the heavy write, outside the transaction
        written: ModelVersion | None = None
        try:
            with self.store.tx() as tx:
                tx.lock(_blob_lock(prepared.sha256))
                existing = _versions(tx, name)
                same = [m for m in existing if m.sha256 == prepared.sha256]
                if wanted is None and same:
                    self._ensure_files(same[-1], prepared.data)
                    return Pushed(same[-1], False)
                if wanted is not None:
                    row = tx.get_model(name, wanted)
                    if row is not None:
                        current = _version(row)
                        if current.sha256 != prepared.sha256:
                            raise ConflictError(
                                f"model {current.ref} already exists with other content "
                                f"(sha256 {current.sha256[:12]}); versions never change: push "
                                "without --version for the next number, or pick a new version")
                        self._ensure_files(current, prepared.data)
                        return Pushed(current, False)
                model = new_version(name, wanted or _next_version(existing), prepared, metadata)
                tx.lock(_version_lock(model.name, model.version))
                tx.add_model(_row(model))
                tx.add_event(MODEL_EVENT_KIND, name, "Pushed",
                             f"{model.ref}: {model.format}, {model.size} bytes, "
                             f"sha256 {model.sha256[:12]}")
                self.files.put_blob(prepared.data)  # again, in case a remove took it meanwhile
                self.files.write_record(model)
                written = model
        except BaseException:
            if written is not None:
                self.files.remove_record(written.name, written.version)
            raise
        return Pushed(model, True)

    def _ensure_files(self, model: ModelVersion, data: bytes) -> None:
        self.files.put_blob(data)
        if self.files.read_record(model.name, model.version) != model:
            self.files.write_record(model)

    def remove(self, name: str, version: int | str) -> ModelVersion:
        """Remove a version no applied spec uses; its bytes go when no version has them.

        Raises :class:`ConflictError` naming the objects that use it.
        """
        version = normalize_version(version)
        with self.store.tx() as tx:
            tx.lock(_version_lock(name, version))
            model = self._get(tx, name, version)
            users = self.users(name, version, tx)
            if users:
                raise ConflictError(
                    f"model {model.ref} is in use by {', '.join(users)}; change those specs to "
                    "another model version or delete them, then remove it")
            tx.remove_model(name, version)
            tx.add_event(MODEL_EVENT_KIND, name, "Removed", f"{model.ref}: sha256 "
                         f"{model.sha256[:12]}")
        self.files.remove_record(name, version)
        self._collect_blob(model.sha256)
        return model

    def _collect_blob(self, sha256: str) -> None:
        with self.store.tx() as tx:
            tx.lock(_blob_lock(sha256))
            if not tx.list_models(sha256=sha256):
                self.files.remove_blob(sha256)

    def sync(self) -> None:
        """Make the files match the index: rewrite missing records, drop stale ones and blobs.

        A row whose blob is gone (another host's data directory, or a damaged
        one) is left alone: :meth:`resolve` then says the file is missing.
        """
        with self.store.tx(readonly=True) as tx:
            rows = {m.ref: m for m in _versions(tx)}
        for model in rows.values():
            try:
                current = self.files.read_record(model.name, model.version)
            except ModelError:
                current = None  # damaged: written anew below
            if self.files.blob_path(model.sha256).is_file() and current != model:
                self.files.write_record(model)
        for record in self.files.records():
            if record.ref not in rows:
                with self.store.tx() as tx:
                    tx.lock(_version_lock(record.name, record.version))
                    if tx.get_model(record.name, record.version) is None:
                        self.files.remove_record(record.name, record.version)
        used = {m.sha256 for m in rows.values()}
        for sha in self.files.blobs():
            if sha not in used:
                self._collect_blob(sha)
