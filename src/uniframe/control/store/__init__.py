"""The control plane's durable state: objects, replicas, revisions, rollouts, events, models and
service endpoints.

One repository API (:class:`Store`, :class:`Tx`) over two SQL dialects: a
SQLite file in WAL mode by default (``<data>/state.db``), or PostgreSQL when
given a ``postgresql://`` URL, so a single host needs no database server and a
team can share one. Every write happens inside ``with store.tx() as tx:`` and
an event is appended in the same transaction as the change it describes, so a
crash leaves either both or neither.

- ``records``: the rows as frozen dataclasses.
- ``schema``: the tables, as migrations counted in ``schema_version``.
- ``dialect``: connections, transactions and errors per database.
- ``store``: :class:`Store` and :class:`Tx`.
"""

from uniframe.control.store.records import (
    Endpoint,
    Event,
    EventType,
    ModelRecord,
    ObjectRecord,
    ReplicaRecord,
    Revision,
    RolloutRecord,
)
from uniframe.control.store.schema import SCHEMA_VERSION
from uniframe.control.store.store import (
    STORE_ENV,
    UNSET,
    Store,
    Tx,
    canonical_json,
    default_target,
    spec_digest,
)

__all__ = [
    "SCHEMA_VERSION",
    "STORE_ENV",
    "UNSET",
    "Endpoint",
    "Event",
    "EventType",
    "ModelRecord",
    "ObjectRecord",
    "ReplicaRecord",
    "Revision",
    "RolloutRecord",
    "Store",
    "Tx",
    "canonical_json",
    "default_target",
    "spec_digest",
]
