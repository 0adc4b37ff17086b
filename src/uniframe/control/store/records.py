"""The rows of the state store as frozen dataclasses: what callers read and hand back.

Records are values, not live views: a caller reads one inside a transaction,
decides, and writes back through the transaction (an object's ``generation``
travels with it so the write can tell whether someone else got there first).
Times are Unix seconds (``time.time()``) in both dialects, so no time zone or
driver conversion can differ between SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class ObjectRecord:
    """An applied spec (``InferenceService``, ``Workload``, ...) as the user last wrote it.

    ``generation`` starts at 1 and grows by one with every change of the spec
    and with deletion; ``digest`` is ``sha256:<hex>`` of the spec's canonical
    JSON, so "did the spec change?" is a string comparison. A deleted object
    stays (``deleted=True``) until its replicas are gone and it is purged.
    """

    kind: str
    name: str
    spec: dict[str, Any]
    digest: str
    generation: int
    created_at: float
    updated_at: float
    deleted: bool = False

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class ReplicaRecord:
    """One replica the control plane started (or means to start) for an object.

    ``desired`` is what the reconciler wants (``running`` or ``stopped``);
    ``state`` is what it last observed. ``restarts`` and ``next_restart_at``
    carry the crash back-off across daemon restarts.
    """

    id: str
    kind: str
    name: str
    driver: str
    image_digest: str
    state: str
    desired: str
    host_port: int | None
    created_at: float
    updated_at: float
    last_error: str = ""
    restarts: int = 0
    next_restart_at: float | None = None
    revision: str = ""


@dataclass(frozen=True)
class Event:
    """Something that happened to an object (and maybe one of its replicas), in order by ``id``."""

    id: int
    time: float
    kind: str
    name: str
    replica_id: str | None
    type: EventType
    reason: str
    message: str


@dataclass(frozen=True)
class Endpoint:
    """A service's stable host port: it survives replicas coming and going and daemon restarts."""

    service: str
    host_port: int
    created_at: float


@dataclass(frozen=True)
class Revision:
    """One distinct spec an object has run, numbered in the order it was last rolled out.

    ``digest`` covers what replicas are made from (model, runtime, resources,
    ...), not the replica count, so scaling is not a revision. Rolling back to
    an earlier spec renumbers it as the newest, as ``kubectl rollout undo`` does.
    """

    kind: str
    name: str
    number: int
    digest: str
    spec: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class RolloutRecord:
    """The latest rollout of an object: from which revision to which, and how far it got."""

    kind: str
    name: str
    strategy: str
    from_digest: str
    to_digest: str
    state: str
    traffic_percent: int | None
    message: str
    started_at: float
    updated_at: float


@dataclass(frozen=True)
class ModelRecord:
    """One row of the model registry's index: a pushed model version as the store keeps it.

    The store owns its own record rather than borrowing the build layer's
    :class:`~uniframe.build.modelstore.ModelVersion` (the file record a build
    reads), so the store imports nothing above it; the registry, which sees
    both, converts at its edge.
    """

    name: str
    version: str
    sha256: str
    format: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    size: int
    created_at: float
    metadata: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"
