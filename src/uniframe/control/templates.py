"""Snapshot templates of autoscaled services: one per revision, cold starts restored from it.

A service with ``autoscaling`` whose driver has the ``snapshot`` capability
(asked of the registry, never guessed from the runtime's name) gets
snapshottable replicas. The first replica of a revision that is ready, booted
(not itself a clone) and has answered one warm-up inference becomes the
revision's template; every later cold start of that revision, from zero or a
scale-up, restores a clone from it instead of booting. A restore that fails
for any reason (a stale template after a QEMU or kernel change is a
:class:`~uniframe.runtime.snapshot.SnapshotMismatchError`) boots the replica
instead, says why in a Warning event, and marks that template stale: it is
never tried again, and the next booted replica becomes a fresh template.
Templates of a revision no replica runs any more (a finished rollout, a
deleted service) are removed, stale ones included; not before, because a full
VM's clones read their disk from the template's overlay.

Where the record lives: one small JSON file per service under
``<state>/templates/`` (written atomically), not a store table. The template
is a fact about files on this host, next to the snapshot files the driver
keeps under the same state root, and it needs no query or transaction with
other records; a table would need a schema migration for a list of at most a
few entries. A daemon restarted reads the file and goes on restoring from the
same template.

The template is taken before the endpoint is told the replica is ready (the
reconciler calls :meth:`Templates.keep_up` right after observing replicas),
so no client connection is open on it: user-mode networking cannot carry a
TCP connection into a clone. A snapshot that fails anyway (a connection was
open, the guest did not answer the warm-up) is reported once and tried again
after :data:`RETRY_AFTER` seconds.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniframe.control.states import READY
from uniframe.control.store import ObjectRecord, ReplicaRecord, Store
from uniframe.control.targets import Target
from uniframe.errors import UniframeError
from uniframe.runtime.driver import Driver
from uniframe.runtime.registry import Capability, Registry
from uniframe.runtime.replica import Replica
from uniframe.runtime.snapshot import Snapshot
from uniframe.spec import InferenceService

__all__ = ["RETRY_AFTER", "Made", "Templates"]

RETRY_AFTER = 30.0     # seconds before a failed snapshot is tried again
WARMUP_TIMEOUT = 30.0  # a first inference under TCG can take seconds


@dataclass(frozen=True)
class Made:
    """A replica :meth:`Templates.make` made: booted (created, not started) or restored (running)."""

    replica: Replica
    port: int | None
    restored_from: Snapshot | None = None


@dataclass
class _Entry:
    revision: str
    snapshot: Snapshot
    stale: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "snapshot": self.snapshot.to_json(),
                "stale": self.stale}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Entry:
        return cls(str(data["revision"]), Snapshot.from_json(data["snapshot"]),
                   bool(data.get("stale", False)))


class Templates:
    """The template records of every service, and the acts on them the reconciler asks for."""

    def __init__(self, store: Store, root: Path, registry: Registry,
                 driver: Callable[[str], Driver], log: Callable[[str], None]) -> None:
        self.store = store
        self.root = root
        self.registry = registry
        self.driver = driver
        self.log = log
        self._lock = threading.Lock()
        self._retry_at: dict[tuple[str, str], float] = {}  # (service, revision) -> monotonic

    # -- the record ------------------------------------------------------------------------

    def _file(self, service: str) -> Path:
        return self.root / f"{service}.json"

    def _load(self, service: str) -> list[_Entry]:
        path = self._file(service)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            self.log(f"templates of {service}: {path} unreadable ({exc}); booting instead")
            return []
        entries: list[_Entry] = []
        for item in data.get("templates", []):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                entries.append(_Entry.from_json(item))
        return entries

    def _save(self, service: str, entries: list[_Entry]) -> None:
        path = self._file(service)
        if not entries:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"templates": [e.to_json() for e in entries]}, indent=1))
        os.replace(tmp, path)

    def template(self, service: str, revision: str) -> Snapshot | None:
        """The revision's usable template, if one was taken."""
        with self._lock:
            return next((e.snapshot for e in self._load(service)
                         if e.revision == revision and not e.stale), None)

    def all(self, service: str) -> list[Snapshot]:
        """Every template recorded for ``service`` (stale ones too), oldest first."""
        with self._lock:
            return [e.snapshot for e in self._load(service)]

    # -- what the reconciler asks ----------------------------------------------------------

    def wanted(self, doc: InferenceService, driver_kind: str) -> bool:
        """Whether ``doc``'s replicas use templates: it autoscales and its driver can snapshot."""
        return (doc.spec.autoscaling is not None
                and self.registry.entry(driver_kind).can(Capability.SNAPSHOT))

    def make(self, obj: ObjectRecord, target: Target, revision: str, driver: Driver) -> Made:
        """A new replica of ``revision``: restored from its template when there is one (then
        already running), else created to be booted. A failed restore boots, with a Warning
        event saying why, and that template is not tried again."""
        snap = self.template(obj.name, revision) if target.configure is not None else None
        if snap is not None and target.configure is not None:
            config, port = target.configure()
            try:
                return Made(driver.restore(snap, config), port, snap)
            except Exception as exc:  # whatever failed, a boot still serves the request
                self._stale(obj.name, snap.id)
                why = str(exc) if isinstance(exc, UniframeError) else (
                    f"internal error: {type(exc).__name__}: {exc}")
                self._event(obj, "RestoreFailed",
                            f"restoring template {snap.id} failed ({why[:1500]}); booting a "
                            "replica instead; the next booted replica becomes a new template",
                            warning=True)
        replica, probe_port = target.make(driver)
        return Made(replica, probe_port)

    def keep_up(self, obj: ObjectRecord, target: Target, revision: str,
                new: Sequence[ReplicaRecord], everyone: Sequence[ReplicaRecord]) -> None:
        """Take the revision's template if it has none and a booted replica of it is ready;
        remove the templates of revisions none of ``everyone`` (the object's replicas) runs."""
        self.retire(obj.name, keep={revision} | {r.revision for r in everyone})
        if target.configure is None or self.template(obj.name, revision) is not None:
            return
        if time.monotonic() < self._retry_at.get((obj.name, revision), 0.0):
            return
        driver = self.driver(target.driver_kind)
        for rec in new:
            if rec.state != READY or rec.host_port is None:
                continue
            with contextlib.suppress(UniframeError):
                replica = driver.get(rec.id)
                if replica.config.snapshottable and "restored_from" not in replica.extra:
                    self._take(obj, target, revision, driver, rec)
                    return

    def _take(self, obj: ObjectRecord, target: Target, revision: str, driver: Driver,
              rec: ReplicaRecord) -> None:
        began = time.monotonic()
        try:
            if target.warmup is not None and rec.host_port is not None:
                _warm_up(rec.host_port, *target.warmup)
            snap = driver.snapshot(rec.id)
        except (UniframeError, OSError, http.client.HTTPException) as exc:
            first = (obj.name, revision) not in self._retry_at
            self._retry_at[(obj.name, revision)] = time.monotonic() + RETRY_AFTER
            if first:
                self._event(obj, "TemplateFailed",
                            f"snapshotting {rec.id} as the revision's template failed ({exc}); "
                            f"cold starts boot meanwhile; trying again in {RETRY_AFTER:g} s",
                            warning=True)
            return
        self._retry_at.pop((obj.name, revision), None)
        with self._lock:
            entries = self._load(obj.name)
            entries.append(_Entry(revision, snap))
            self._save(obj.name, entries)
        self._event(obj, "TemplateTaken",
                    f"{rec.id} snapshotted as template {snap.id} after a warm-up inference "
                    f"({time.monotonic() - began:.2f} s); cold starts now restore clones of it")

    def retire(self, service: str, keep: set[str]) -> list[Snapshot]:
        """Remove the templates of revisions not in ``keep``; return those removed."""
        with self._lock:
            entries = self._load(service)
            gone = [e for e in entries if e.revision not in keep]
            if not gone:
                return []
            left = [e for e in entries if e.revision in keep]
            for entry in gone:
                try:
                    self.driver(entry.snapshot.driver).remove_snapshot(entry.snapshot)
                except (UniframeError, OSError) as exc:
                    self.log(f"templates of {service}: removing {entry.snapshot.id} failed "
                             f"({exc}); its record is kept to try again")
                    left.append(entry)
            self._save(service, left)
        for key in [k for k in self._retry_at if k[0] == service and k[1] not in keep]:
            del self._retry_at[key]
        return [e.snapshot for e in gone if e not in left]

    def _stale(self, service: str, snapshot_id: str) -> None:
        with self._lock:
            entries = self._load(service)
            for entry in entries:
                if entry.snapshot.id == snapshot_id:
                    entry.stale = True
            self._save(service, entries)

    def _event(self, obj: ObjectRecord, reason: str, message: str, *,
               warning: bool = False) -> None:
        self.log(f"{obj.ref}: {message}")
        with contextlib.suppress(UniframeError), self.store.tx() as tx:
            if tx.get_object(obj.kind, obj.name, include_deleted=True) is not None:
                tx.add_event(obj.kind, obj.name, reason, message,
                             type="Warning" if warning else "Normal")


def _warm_up(port: int, path: str, body: bytes) -> None:
    """One inference; raise if it is not answered 200. The connection is closed after it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WARMUP_TIMEOUT)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise OSError(f"the warm-up inference on port {port} answered {response.status}")
    finally:
        conn.close()
