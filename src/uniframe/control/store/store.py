"""The state store: typed reads and writes over SQL, every write inside a transaction.

Usage::

    store = Store.open()                       # <data>/state.db, or $UNIFRAME_STORE
    with store.tx() as tx:
        obj = tx.get_object("InferenceService", "iris")
        tx.update_object("InferenceService", "iris", new_spec, generation=obj.generation)
        tx.add_event("InferenceService", "iris", "Scaled", "2 -> 3 replicas")

Leaving the ``with`` block commits; an exception rolls back everything the
block wrote and propagates. An exception raised by the store inside a block
ends that transaction (PostgreSQL refuses further statements in it), so let it
propagate rather than catching it and carrying on.

Concurrency: objects carry a ``generation``; :meth:`Tx.update_object` and
:meth:`Tx.delete_object` with ``generation=`` write only if nobody changed the
object since it was read, and raise :class:`~uniframe.errors.ConflictError`
otherwise (re-read and retry). Each thread gets its own connection, so one
``Store`` can be shared by the daemon's threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from uniframe.control.store.dialect import (
    Connection,
    Integrity,
    PostgresConnection,
    SqliteConnection,
    redact,
)
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
from uniframe.control.store.schema import migrate
from uniframe.errors import ConflictError, NotFoundError, StateError
from uniframe.paths import data_dir

STORE_ENV = "UNIFRAME_STORE"


class _Unset:
    """Marks an argument the caller left out, where ``None`` is a value one can set."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def spec_digest(spec: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def default_target() -> str:
    """``$UNIFRAME_STORE`` (a path or a ``postgresql://`` URL), else ``<data>/state.db``."""
    return os.environ.get(STORE_ENV) or str(data_dir() / "state.db")


def _is_postgres(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


class Store:
    """A SQLite file or a PostgreSQL database holding the control plane's state."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.dialect = "postgresql" if _is_postgres(target) else "sqlite"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: weakref.WeakSet[Connection] = weakref.WeakSet()  # every thread's, to close
        self._closed = False
        self.migrated_from = migrate(self._connection(), self.where)

    @classmethod
    def open(cls, target: str | Path | None = None) -> Store:
        """Open (creating and migrating as needed) the store at a path or ``postgresql://`` URL.

        ``sqlite:///abs/path`` is accepted as a path; ``None`` means :func:`default_target`.
        """
        text = str(target) if target is not None else default_target()
        if text.startswith("sqlite://"):
            text = text.removeprefix("sqlite://") or str(data_dir() / "state.db")
        elif "://" in text and not _is_postgres(text):
            raise StateError(f"state store {redact(text)}: use a file path, sqlite:///PATH or "
                             "postgresql://USER@HOST/DB")
        return cls(text)

    @property
    def where(self) -> str:
        """The store's location for messages (a PostgreSQL password is masked)."""
        return redact(self.target)

    def __repr__(self) -> str:
        return f"Store({self.where!r})"

    def _connection(self) -> Connection:
        if self._closed:
            raise StateError(f"state store {self.where} is closed")
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.broken:
            self._forget(conn)
            conn = None
        if conn is None:
            if self.dialect == "postgresql":
                conn = PostgresConnection(self.target)
            else:
                conn = SqliteConnection(Path(self.target))
            self._local.conn = conn
            with self._lock:
                self._conns.add(conn)
        return conn

    def _forget(self, conn: Connection) -> None:
        with contextlib.suppress(Exception):
            conn.close()
        with self._lock:
            self._conns.discard(conn)
        self._local.conn = None

    def release(self) -> None:
        """Close this thread's connection now (the next transaction opens a new one).

        A thread's connection is also closed when the thread ends; this is for
        long-lived threads that will not use the store for a while.
        """
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            if getattr(self._local, "in_tx", False):
                raise RuntimeError("Store.release() inside a transaction; leave it first")
            self._forget(conn)

    @contextlib.contextmanager
    def tx(self, *, readonly: bool = False) -> Iterator[Tx]:
        """A transaction: committed when the block ends, rolled back if it raises.

        ``readonly=True`` only reads (SQLite does not take the write lock for it).
        Transactions do not nest: one per thread at a time.
        """
        if getattr(self._local, "in_tx", False):
            raise RuntimeError("Store.tx() does not nest; pass the open Tx down instead")
        conn = self._connection()
        self._local.in_tx = True
        try:
            conn.begin(readonly=readonly)
            tx = Tx(conn, readonly=readonly)
            try:
                yield tx
                conn.commit()
            except BaseException:
                try:
                    conn.rollback()
                except StateError:
                    self._forget(conn)  # the connection died with the transaction
                raise
            finally:
                tx._closed = True
        finally:
            self._local.in_tx = False

    def close(self) -> None:
        """Close every thread's connection; the store cannot be used afterwards."""
        self._closed = True
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_OBJECT_COLUMNS = "kind, name, spec, spec_digest, generation, created_at, updated_at, deleted"
_REPLICA_COLUMNS = ("id, object_kind, object_name, driver, image_digest, state, desired, "
                    "host_port, created_at, updated_at, last_error, restarts, next_restart_at, "
                    "revision")
_REVISION_COLUMNS = "object_kind, object_name, number, digest, spec, created_at"
_ROLLOUT_COLUMNS = ("object_kind, object_name, strategy, from_digest, to_digest, state, "
                    "traffic_percent, message, started_at, updated_at")
_EVENT_COLUMNS = "id, at, object_kind, object_name, replica_id, type, reason, message"
_MODEL_COLUMNS = "name, version, sha256, format, inputs, outputs, size, created_at, metadata"


def _object(row: Sequence[Any]) -> ObjectRecord:
    return ObjectRecord(kind=row[0], name=row[1], spec=json.loads(row[2]), digest=row[3],
                        generation=int(row[4]), created_at=float(row[5]),
                        updated_at=float(row[6]), deleted=bool(row[7]))


def _replica(row: Sequence[Any]) -> ReplicaRecord:
    return ReplicaRecord(id=row[0], kind=row[1], name=row[2], driver=row[3], image_digest=row[4],
                         state=row[5], desired=row[6],
                         host_port=None if row[7] is None else int(row[7]),
                         created_at=float(row[8]), updated_at=float(row[9]), last_error=row[10],
                         restarts=int(row[11]),
                         next_restart_at=None if row[12] is None else float(row[12]),
                         revision=row[13])


def _revision(row: Sequence[Any]) -> Revision:
    return Revision(kind=row[0], name=row[1], number=int(row[2]), digest=row[3],
                    spec=json.loads(row[4]), created_at=float(row[5]))


def _rollout(row: Sequence[Any]) -> RolloutRecord:
    return RolloutRecord(kind=row[0], name=row[1], strategy=row[2], from_digest=row[3],
                         to_digest=row[4], state=row[5],
                         traffic_percent=None if row[6] is None else int(row[6]),
                         message=row[7], started_at=float(row[8]), updated_at=float(row[9]))


def _event(row: Sequence[Any]) -> Event:
    return Event(id=int(row[0]), time=float(row[1]), kind=row[2], name=row[3], replica_id=row[4],
                 type=row[5], reason=row[6], message=row[7])


def _model(row: Sequence[Any]) -> ModelRecord:
    return ModelRecord(name=row[0], version=row[1], sha256=row[2], format=row[3],
                       inputs=json.loads(row[4]), outputs=json.loads(row[5]), size=int(row[6]),
                       created_at=float(row[7]), metadata=json.loads(row[8]))


class Tx:
    """The reads and writes of one transaction; get one from :meth:`Store.tx`."""

    def __init__(self, conn: Connection, *, readonly: bool) -> None:
        self._conn = conn
        self._readonly = readonly
        self._closed = False
        self.now = time.time()
        """The transaction's clock: every row it writes carries this time."""

    def _run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._write(sql, params)[0]

    def _write(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[tuple[Any, ...]], int]:
        if self._closed:
            raise RuntimeError("this transaction has ended; open a new one with store.tx()")
        result = self._conn.execute(sql, params)
        return result.rows, result.rowcount

    def _check_writable(self) -> None:
        if self._readonly:
            raise RuntimeError("this transaction is read-only; open store.tx() to write")

    def lock(self, name: str) -> None:
        """Hold the named lock until this transaction ends, across threads and processes.

        For decisions that span rows or files the database cannot see (a
        model's blob on disk): on PostgreSQL an advisory lock; on SQLite a no-op,
        because a write transaction already excludes every other writer.
        """
        self._check_writable()
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self._conn.lock(key)

    # -- objects ---------------------------------------------------------------------------

    def get_object(self, kind: str, name: str, *, include_deleted: bool = False) -> ObjectRecord | None:
        rows = self._run(f"SELECT {_OBJECT_COLUMNS} FROM objects WHERE kind = ? AND name = ?",
                         (kind, name))
        if not rows:
            return None
        obj = _object(rows[0])
        return obj if include_deleted or not obj.deleted else None

    def list_objects(self, kind: str | None = None, *,
                     include_deleted: bool = False) -> list[ObjectRecord]:
        sql = f"SELECT {_OBJECT_COLUMNS} FROM objects"
        params: tuple[Any, ...] = ()
        if kind is not None:
            sql += " WHERE kind = ?"
            params = (kind,)
        objs = [_object(r) for r in self._run(sql + " ORDER BY kind, name", params)]
        return objs if include_deleted else [o for o in objs if not o.deleted]

    def create_object(self, kind: str, name: str, spec: dict[str, Any]) -> ObjectRecord:
        """Store a new object at generation 1 (or revive a deleted one at its next generation).

        Raises :class:`ConflictError` if a live object of that kind and name exists.
        """
        self._check_writable()
        old = self.get_object(kind, name, include_deleted=True)
        if old is not None and not old.deleted:
            raise ConflictError(f"{kind}/{name} already exists (generation {old.generation}); "
                                "update it instead")
        digest = spec_digest(spec)
        if old is None:
            try:
                self._write(f"INSERT INTO objects ({_OBJECT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (kind, name, canonical_json(spec), digest, 1, self.now, self.now,
                             False))
            except Integrity:
                raise ConflictError(f"{kind}/{name} was created by someone else meanwhile; "
                                    "read it and update it instead") from None
            generation = 1
        else:
            generation = old.generation + 1
            self._write("UPDATE objects SET spec = ?, spec_digest = ?, generation = ?, "
                        "created_at = ?, updated_at = ?, deleted = ? "
                        "WHERE kind = ? AND name = ? AND generation = ?",
                        (canonical_json(spec), digest, generation, self.now, self.now, False,
                         kind, name, old.generation))
        self.add_event(kind, name, "Created", f"generation {generation}")
        return ObjectRecord(kind, name, spec, digest, generation, self.now, self.now, False)

    def update_object(self, kind: str, name: str, spec: dict[str, Any], *,
                      generation: int) -> ObjectRecord:
        """Replace the spec if the object is still at ``generation``; the new one is +1.

        Raises :class:`NotFoundError` if there is no such live object and
        :class:`ConflictError` if it changed since ``generation`` was read.
        An unchanged spec still moves the generation: the caller asked to write.
        """
        self._check_writable()
        digest = spec_digest(spec)
        _, count = self._write(
            "UPDATE objects SET spec = ?, spec_digest = ?, generation = generation + 1, "
            "updated_at = ? WHERE kind = ? AND name = ? AND generation = ? AND NOT deleted",
            (canonical_json(spec), digest, self.now, kind, name, generation))
        if count != 1:
            self._raise_missing_or_stale(kind, name, generation, "update")
        obj = self.get_object(kind, name)
        assert obj is not None
        self.add_event(kind, name, "Updated", f"generation {obj.generation}")
        return obj

    def apply_object(self, kind: str, name: str, spec: dict[str, Any], *,
                     generation: int | None = None) -> tuple[ObjectRecord, bool]:
        """Create or update, like ``kubectl apply``; return the object and whether it changed.

        An identical spec changes nothing (same generation, no event). With
        ``generation`` the update is conditional as in :meth:`update_object`.
        """
        old = self.get_object(kind, name)
        if old is None:
            if generation is not None:
                self._raise_missing_or_stale(kind, name, generation, "apply")
            return self.create_object(kind, name, spec), True
        if generation is not None and generation != old.generation:
            self._raise_missing_or_stale(kind, name, generation, "apply")
        if old.digest == spec_digest(spec):
            return old, False
        return self.update_object(kind, name, spec, generation=old.generation), True

    def delete_object(self, kind: str, name: str, *, generation: int | None = None) -> ObjectRecord:
        """Mark the object deleted (generation +1); :meth:`purge_object` removes it for good.

        The row stays so the reconciler can still see which replicas to stop.
        """
        self._check_writable()
        sql = ("UPDATE objects SET deleted = ?, generation = generation + 1, updated_at = ? "
               "WHERE kind = ? AND name = ? AND NOT deleted")
        params: tuple[Any, ...] = (True, self.now, kind, name)
        if generation is not None:
            sql += " AND generation = ?"
            params += (generation,)
        _, count = self._write(sql, params)
        if count != 1:
            self._raise_missing_or_stale(kind, name, generation, "delete")
        obj = self.get_object(kind, name, include_deleted=True)
        assert obj is not None
        self.add_event(kind, name, "Deleted", f"generation {obj.generation}")
        return obj

    def purge_object(self, kind: str, name: str) -> None:
        """Remove a deleted object's row once no replica refers to it."""
        self._check_writable()
        obj = self.get_object(kind, name, include_deleted=True)
        if obj is None:
            raise NotFoundError(f"{kind}/{name} does not exist")
        if not obj.deleted:
            raise ConflictError(f"{kind}/{name} is not deleted; delete it before purging it")
        left = self.list_replicas(kind, name)
        if left:
            raise ConflictError(f"{kind}/{name} still has replicas "
                                f"({', '.join(r.id for r in left)}); remove them first")
        self._write("DELETE FROM revisions WHERE object_kind = ? AND object_name = ?", (kind, name))
        self._write("DELETE FROM rollouts WHERE object_kind = ? AND object_name = ?", (kind, name))
        try:
            self._write("DELETE FROM objects WHERE kind = ? AND name = ?", (kind, name))
        except Integrity:
            raise ConflictError(f"{kind}/{name} gained a replica meanwhile; remove it "
                                "first") from None

    def _raise_missing_or_stale(self, kind: str, name: str, generation: int | None,
                                verb: str) -> None:
        current = self.get_object(kind, name)
        if current is None:
            raise NotFoundError(f"{kind}/{name} does not exist; create it first"
                                if verb != "delete" else f"{kind}/{name} does not exist")
        raise ConflictError(
            f"cannot {verb} {kind}/{name}: it was changed meanwhile (you read generation "
            f"{generation}, it is now at {current.generation}); read it again and retry"
        )

    # -- replicas --------------------------------------------------------------------------

    def add_replica(self, id: str, kind: str, name: str, *, driver: str, image_digest: str,
                    state: str = "pending", desired: str = "running",
                    host_port: int | None = None, revision: str = "") -> ReplicaRecord:
        """Record a replica of a live object (before starting it, so a crash cannot orphan it)."""
        self._check_writable()
        if self.get_object(kind, name) is None:
            raise NotFoundError(f"{kind}/{name} does not exist (or is deleted); "
                                f"cannot add replica {id} to it")
        if self.get_replica(id) is not None:
            raise ConflictError(f"replica {id} already exists")
        try:
            self._write(f"INSERT INTO replicas ({_REPLICA_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (id, kind, name, driver, image_digest, state, desired, host_port,
                         self.now, self.now, "", 0, None, revision))
        except Integrity as exc:
            raise ConflictError(f"cannot add replica {id} to {kind}/{name}: {exc}") from None
        replica = self.get_replica(id)
        assert replica is not None
        return replica

    def get_replica(self, id: str) -> ReplicaRecord | None:
        rows = self._run(f"SELECT {_REPLICA_COLUMNS} FROM replicas WHERE id = ?", (id,))
        return _replica(rows[0]) if rows else None

    def list_replicas(self, kind: str | None = None, name: str | None = None) -> list[ReplicaRecord]:
        """Every replica, or those of one kind, or of one object (``kind`` and ``name``)."""
        sql = f"SELECT {_REPLICA_COLUMNS} FROM replicas"
        conds: list[str] = []
        params: list[Any] = []
        if kind is not None:
            conds.append("object_kind = ?")
            params.append(kind)
        if name is not None:
            conds.append("object_name = ?")
            params.append(name)
        if conds:
            sql += " WHERE " + " AND ".join(conds)
        return [_replica(r) for r in self._run(sql + " ORDER BY created_at, id", params)]

    def update_replica(
        self,
        id: str,
        *,
        state: str | _Unset = UNSET,
        desired: str | _Unset = UNSET,
        image_digest: str | _Unset = UNSET,
        host_port: int | _Unset | None = UNSET,
        last_error: str | _Unset = UNSET,
        restarts: int | _Unset = UNSET,
        next_restart_at: float | _Unset | None = UNSET,
        revision: str | _Unset = UNSET,
    ) -> ReplicaRecord:
        """Change the given fields (``None`` is a value here: it clears a port or a back-off)."""
        self._check_writable()
        changes = {"state": state, "desired": desired, "image_digest": image_digest,
                   "host_port": host_port, "last_error": last_error, "restarts": restarts,
                   "next_restart_at": next_restart_at, "revision": revision}
        given = {k: v for k, v in changes.items() if not isinstance(v, _Unset)}
        sets = ", ".join(f"{column} = ?" for column in given)
        sql = f"UPDATE replicas SET {sets}{', ' if sets else ''}updated_at = ? WHERE id = ?"
        _, count = self._write(sql, (*given.values(), self.now, id))
        if count != 1:
            raise NotFoundError(f"replica {id} does not exist")
        replica = self.get_replica(id)
        assert replica is not None
        return replica

    def remove_replica(self, id: str) -> None:
        self._check_writable()
        _, count = self._write("DELETE FROM replicas WHERE id = ?", (id,))
        if count != 1:
            raise NotFoundError(f"replica {id} does not exist")

    # -- revisions and rollouts ------------------------------------------------------------

    def record_revision(self, kind: str, name: str, digest: str,
                        spec: dict[str, Any]) -> Revision:
        """The revision for ``digest``, made the newest if it is not already.

        Called by the reconciler each pass: a digest that is already the newest
        changes nothing; an older digest coming back (a rollback) is renumbered
        as the newest, so "the previous revision" always means the one before it.
        """
        revs = self.list_revisions(kind, name)
        if revs and revs[-1].digest == digest:
            return revs[-1]
        self._check_writable()
        number = (revs[-1].number + 1) if revs else 1
        if any(r.digest == digest for r in revs):
            self._write("UPDATE revisions SET number = ?, spec = ?, created_at = ? "
                        "WHERE object_kind = ? AND object_name = ? AND digest = ?",
                        (number, canonical_json(spec), self.now, kind, name, digest))
        else:
            self._write(f"INSERT INTO revisions ({_REVISION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                        (kind, name, number, digest, canonical_json(spec), self.now))
        return Revision(kind, name, number, digest, spec, self.now)

    def list_revisions(self, kind: str, name: str) -> list[Revision]:
        """An object's revisions, oldest first."""
        rows = self._run(f"SELECT {_REVISION_COLUMNS} FROM revisions "
                         "WHERE object_kind = ? AND object_name = ? ORDER BY number",
                         (kind, name))
        return [_revision(r) for r in rows]

    def get_rollout(self, kind: str, name: str) -> RolloutRecord | None:
        rows = self._run(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts "
                         "WHERE object_kind = ? AND object_name = ?", (kind, name))
        return _rollout(rows[0]) if rows else None

    def start_rollout(self, kind: str, name: str, *, strategy: str, from_digest: str,
                      to_digest: str, state: str, traffic_percent: int | None,
                      message: str = "") -> RolloutRecord:
        """Make this the object's rollout, replacing the one before (its end is in the events)."""
        self._check_writable()
        self._write("DELETE FROM rollouts WHERE object_kind = ? AND object_name = ?", (kind, name))
        self._write(f"INSERT INTO rollouts ({_ROLLOUT_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (kind, name, strategy, from_digest, to_digest, state, traffic_percent,
                     message, self.now, self.now))
        rollout = self.get_rollout(kind, name)
        assert rollout is not None
        return rollout

    def update_rollout(self, kind: str, name: str, *, state: str,
                       message: str | _Unset = UNSET) -> RolloutRecord:
        self._check_writable()
        if isinstance(message, _Unset):
            sql, params = "UPDATE rollouts SET state = ?, updated_at = ?", [state, self.now]
        else:
            sql, params = ("UPDATE rollouts SET state = ?, message = ?, updated_at = ?",
                           [state, message, self.now])
        _, count = self._write(sql + " WHERE object_kind = ? AND object_name = ?",
                               (*params, kind, name))
        if count != 1:
            raise NotFoundError(f"{kind}/{name} has no rollout")
        rollout = self.get_rollout(kind, name)
        assert rollout is not None
        return rollout

    # -- events ----------------------------------------------------------------------------

    def add_event(self, kind: str, name: str, reason: str, message: str, *,
                  type: EventType = "Normal", replica_id: str | None = None) -> Event:
        """Append an event; it commits or rolls back with the change it describes."""
        self._check_writable()
        if type not in ("Normal", "Warning"):
            raise ValueError(f"event type {type!r}: use Normal or Warning")
        rows = self._run("INSERT INTO events (at, object_kind, object_name, replica_id, type, "
                         "reason, message) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                         (self.now, kind, name, replica_id, type, reason, message))
        return Event(int(rows[0][0]), self.now, kind, name, replica_id, type, reason, message)

    def events(self, kind: str | None = None, name: str | None = None, *,
               replica_id: str | None = None, after_id: int = 0,
               limit: int | None = None) -> list[Event]:
        """Events oldest first; ``after_id`` continues from the last one a watcher saw."""
        conds: list[str] = ["id > ?"]
        params: list[Any] = [after_id]
        for column, value in (("object_kind", kind), ("object_name", name),
                              ("replica_id", replica_id)):
            if value is not None:
                conds.append(f"{column} = ?")
                params.append(value)
        sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE {' AND '.join(conds)} ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_event(r) for r in self._run(sql, params)]

    # -- models (the registry's index; the files are uniframe.build.modelstore's) -----------

    def add_model(self, model: ModelRecord) -> ModelRecord:
        self._check_writable()
        if self.get_model(model.name, model.version) is not None:
            raise ConflictError(f"model {model.ref} already exists; versions are immutable, "
                                "push under a new version")
        try:
            self._write(f"INSERT INTO models ({_MODEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (model.name, model.version, model.sha256, model.format,
                         canonical_json(model.inputs), canonical_json(model.outputs), model.size,
                         model.created_at, canonical_json(model.metadata)))
        except Integrity:
            raise ConflictError(f"model {model.ref} was pushed by someone else meanwhile; "
                                "push again for the next version") from None
        return model

    def get_model(self, name: str, version: str) -> ModelRecord | None:
        rows = self._run(f"SELECT {_MODEL_COLUMNS} FROM models WHERE name = ? AND version = ?",
                         (name, version))
        return _model(rows[0]) if rows else None

    def list_models(self, name: str | None = None, *, sha256: str | None = None) -> list[ModelRecord]:
        """Model versions by name, oldest first within a name."""
        conds: list[str] = []
        params: list[Any] = []
        if name is not None:
            conds.append("name = ?")
            params.append(name)
        if sha256 is not None:
            conds.append("sha256 = ?")
            params.append(sha256)
        sql = f"SELECT {_MODEL_COLUMNS} FROM models"
        if conds:
            sql += " WHERE " + " AND ".join(conds)
        return [_model(r) for r in self._run(sql + " ORDER BY name, created_at, version", params)]

    def remove_model(self, name: str, version: str) -> None:
        self._check_writable()
        _, count = self._write("DELETE FROM models WHERE name = ? AND version = ?",
                               (name, version))
        if count != 1:
            raise NotFoundError(f"model {name}@{version} does not exist")

    # -- service endpoints -----------------------------------------------------------------

    def get_endpoint(self, service: str) -> Endpoint | None:
        rows = self._run("SELECT name, host_port, created_at FROM services WHERE name = ?",
                         (service,))
        return Endpoint(rows[0][0], int(rows[0][1]), float(rows[0][2])) if rows else None

    def list_endpoints(self) -> list[Endpoint]:
        rows = self._run("SELECT name, host_port, created_at FROM services ORDER BY name")
        return [Endpoint(r[0], int(r[1]), float(r[2])) for r in rows]

    def assign_endpoint(self, service: str, host_port: int) -> Endpoint:
        """Give ``service`` its stable host port; one it already has is kept and returned.

        Raises :class:`ConflictError` if another service holds ``host_port``.
        """
        self._check_writable()
        current = self.get_endpoint(service)
        if current is not None:
            return current
        rows = self._run("SELECT name FROM services WHERE host_port = ?", (host_port,))
        if rows:
            raise ConflictError(f"host port {host_port} already belongs to service {rows[0][0]}; "
                                "choose another port")
        try:
            self._write("INSERT INTO services (name, host_port, created_at) VALUES (?, ?, ?)",
                        (service, host_port, self.now))
        except Integrity:
            raise ConflictError(f"host port {host_port} or service {service} was taken "
                                "meanwhile; try again") from None
        return Endpoint(service, host_port, self.now)

    def release_endpoint(self, service: str) -> None:
        self._check_writable()
        self._write("DELETE FROM services WHERE name = ?", (service,))
