"""Make what runs match what was applied: one pass at a time, one object at a time.

The store says what is desired (applied objects) and what the control plane
believes it started (the ``replicas`` table); the drivers say what really
runs. A pass compares the three and acts, so the reconciler holds no state of
its own worth keeping: a daemon killed at any point and started again reads
the same tables, finds its replicas still running (they live in their own
sessions) and carries on without starting duplicates.

Order of writes: a replica is recorded in the store right after the driver
creates it on disk and *before* it is started, so a crash can leave a record
whose process never ran (cleaned up by the next pass), never a running
process nobody knows about.

Crash handling: a replica that dies is started again after a back-off that
doubles with every restart (``BACKOFF_BASE`` … ``BACKOFF_MAX`` seconds); the
count and the next attempt time live in the store so they survive the daemon.
After ``CRASH_LOOP_AFTER`` restarts whose process died within
``QUICK_FAILURE`` seconds, the replica is marked ``crash-loop`` (it still
gets retried, at the longest back-off).
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from uniframe.build.images import build_image, image_port
from uniframe.build.store import Image, ImageStore
from uniframe.control.store import ObjectRecord, ReplicaRecord, Store, Tx, spec_digest
from uniframe.errors import UniframeError
from uniframe.runtime.driver import (
    IMAGE_KIND_RUNTIMES,
    RUNTIME_DRIVERS,
    Driver,
    ReplicaNotFoundError,
    driver_for,
)
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.replica import ReplicaConfig, ReplicaState
from uniframe.runtime.verify import free_port, image_ref
from uniframe.spec import InferenceService, load_data

SERVICE_KIND = "InferenceService"
BACKOFF_BASE = 1.0
BACKOFF_MAX = 60.0
CRASH_LOOP_AFTER = 3
QUICK_FAILURE = 30.0
READY_PATH = "/v2/health/ready"

# Replica states the reconciler writes in the store.
PENDING = "pending"      # recorded, not yet started
STARTING = "starting"    # the process runs, readiness not yet seen
READY = "ready"          # answered GET /v2/health/ready with 200
CRASHED = "crashed"      # died; waiting for its back-off to restart
CRASH_LOOP = "crash-loop"


def build_digest(spec: dict[str, Any]) -> str:
    """The digest of what goes into the image: the spec without its replica count.

    Scaling must not rebuild the image nor replace the replicas that run.
    """
    body = {k: v for k, v in spec.get("spec", {}).items() if k not in ("replicas", "autoscaling")}
    return spec_digest({**spec, "spec": body})


def backoff(restarts: int) -> float:
    """Seconds to wait before restart number ``restarts + 1``."""
    return float(min(BACKOFF_MAX, BACKOFF_BASE * 2 ** max(0, restarts)))


def probe_ready(port: int, timeout: float = 1.0) -> bool:
    """True when the server on ``port`` says it is ready (``GET /v2/health/ready`` -> 200)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", READY_PATH)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _started_seconds_ago(started_at: str | None) -> float | None:
    if not started_at:
        return None
    with contextlib.suppress(ValueError):
        return time.time() - datetime.fromisoformat(started_at).timestamp()
    return None


@dataclass
class PassResult:
    """What one pass did, for logs and tests."""

    objects: int = 0
    errors: int = 0


class Reconciler:
    """Drive every applied InferenceService towards its spec through the runtime drivers."""

    def __init__(self, store: Store, *, state_root: Path | None = None,
                 build_store: ImageStore | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.state_root = state_root
        self.images = build_store or ImageStore()
        self.log = log or (lambda _m: None)
        self._image_cache: dict[tuple[str, str], Image] = {}
        self._failing: dict[str, str] = {}  # object ref -> the failure last reported
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.passes = 0
        self.last_pass_seconds = 0.0
        self.errors = 0

    def _driver(self, kind: str) -> Driver:
        return driver_for(kind, self.state_root / "replicas" if self.state_root else None)

    # -- the loop ----------------------------------------------------------------------------

    def wake(self) -> None:
        """Run the next pass now (an object was applied or deleted)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self, period: float = 1.0) -> None:
        """Pass after pass until :meth:`stop`; a pass that fails is logged and retried."""
        while not self._stop.is_set():
            self.reconcile_once()
            self._wake.wait(period)
            self._wake.clear()

    def reconcile_once(self) -> PassResult:
        """One pass over every object (live or deleted); each object's failure stays its own."""
        started = time.monotonic()
        with self.store.tx(readonly=True) as tx:
            objects = tx.list_objects(SERVICE_KIND, include_deleted=True)
        result = PassResult(objects=len(objects))
        for obj in objects:
            try:
                self.reconcile_object(obj)
                self._failing.pop(obj.ref, None)
            except UniframeError as exc:
                result.errors += 1
                self.errors += 1
                message = str(exc)[:2000]
                if self._failing.get(obj.ref) == message:
                    continue  # the same failure again: one event, not one per pass
                self._failing[obj.ref] = message
                self.log(f"{obj.ref}: {exc}")
                with contextlib.suppress(UniframeError), self.store.tx() as tx:
                    if tx.get_object(obj.kind, obj.name, include_deleted=True) is not None:
                        tx.add_event(obj.kind, obj.name, "ReconcileFailed", message,
                                     type="Warning")
        self.passes += 1
        self.last_pass_seconds = time.monotonic() - started
        return result

    # -- one object --------------------------------------------------------------------------

    def reconcile_object(self, obj: ObjectRecord) -> None:
        with self.store.tx(readonly=True) as tx:
            replicas = tx.list_replicas(obj.kind, obj.name)
        if obj.deleted:
            for rec in replicas:
                self._remove(obj, rec, "object deleted")
            with self.store.tx() as tx:
                current = tx.get_object(obj.kind, obj.name, include_deleted=True)
                if current is not None and current.deleted and not tx.list_replicas(obj.kind, obj.name):
                    tx.purge_object(obj.kind, obj.name)
            return
        service = load_data(obj.spec, obj.ref).spec
        assert isinstance(service, InferenceService)
        runtime = service.spec.runtime
        driver_kind = RUNTIME_DRIVERS[runtime]
        image = self._image(obj, service)
        want = service.spec.replicas or 0

        keep: list[ReplicaRecord] = []
        for rec in replicas:
            if rec.driver != driver_kind or rec.image_digest != image.digest:
                self._remove(obj, rec, "spec changed")
                continue
            survivor = self._observe(obj, rec)
            if survivor is not None:
                keep.append(survivor)
        for rec in keep[want:]:
            self._remove(obj, rec, f"scaled down to {want}")
        for _ in range(want - len(keep)):
            self._create(obj, driver_kind, image)

    def _image(self, obj: ObjectRecord, service: InferenceService) -> Image:
        """The image built from this very spec, built now if none is stored."""
        runtime = service.spec.runtime
        source = build_digest(obj.spec)
        key = (source, runtime)
        cached = self._image_cache.get(key)
        if cached is not None and cached.dir.is_dir():
            return cached
        for image in self.images.list():
            if (image.manifest.get("source_spec_digest") == source
                    and IMAGE_KIND_RUNTIMES.get(image.kind) == runtime):
                self._image_cache[key] = image
                return image
        self._event(obj, "Building", f"building the {runtime} image")
        began = time.monotonic()
        image = build_image(service, source_digest=source, runtime=runtime,
                            store=self.images)
        self._event(obj, "Built", f"image {image.short} in {time.monotonic() - began:.1f} s")
        self._image_cache[key] = image
        return image

    def _create(self, obj: ObjectRecord, driver_kind: str, image: Image) -> None:
        driver = self._driver(driver_kind)
        port = free_port()
        resources = image.manifest.get("resources", {})
        config = ReplicaConfig(
            image=image_ref(image), cpus=max(1, round(float(resources.get("cpus", 1)))),
            memory_mib=max(256, int(resources.get("memory", 256 << 20)) >> 20),
            ports=(PortMapping(port, image_port(image)),))
        replica = driver.create(config)
        try:
            with self.store.tx() as tx:
                tx.add_replica(replica.id, obj.kind, obj.name, driver=driver_kind,
                               image_digest=image.digest, state=PENDING, host_port=port)
                tx.add_event(obj.kind, obj.name, "ReplicaCreated",
                             f"{replica.id} on port {port}", replica_id=replica.id)
        except BaseException:
            with contextlib.suppress(UniframeError):
                driver.remove(replica.id, force=True)
            raise
        self._start(obj, replica.id, driver, "Started")

    def _start(self, obj: ObjectRecord, replica_id: str, driver: Driver, reason: str) -> None:
        try:
            driver.start(replica_id)
        except UniframeError as exc:
            with self.store.tx() as tx:
                rec = tx.get_replica(replica_id)
                restarts = rec.restarts if rec else 0
                tx.update_replica(replica_id, state=CRASHED, last_error=str(exc)[:2000],
                                  next_restart_at=tx.now + backoff(restarts))
                tx.add_event(obj.kind, obj.name, "StartFailed", str(exc)[:2000],
                             type="Warning", replica_id=replica_id)
            return
        with self.store.tx() as tx:
            tx.update_replica(replica_id, state=STARTING, next_restart_at=None)
            tx.add_event(obj.kind, obj.name, reason, f"replica {replica_id}",
                         replica_id=replica_id)

    def _observe(self, obj: ObjectRecord, rec: ReplicaRecord) -> ReplicaRecord | None:
        """Bring one recorded replica's state up to date; None if it was cleaned away."""
        driver = self._driver(rec.driver)
        try:
            status = driver.inspect(rec.id)
            started_at = driver.get(rec.id).started_at
        except ReplicaNotFoundError:
            with self.store.tx() as tx:
                tx.remove_replica(rec.id)
                tx.add_event(obj.kind, obj.name, "ReplicaLost",
                             f"{rec.id} is gone from the host; replacing it", type="Warning",
                             replica_id=rec.id)
            return None
        if status.state is ReplicaState.RUNNING:
            if rec.state == READY:
                return rec
            if rec.host_port is not None and probe_ready(rec.host_port):
                with self.store.tx() as tx:
                    rec = tx.update_replica(rec.id, state=READY, last_error="")
                    tx.add_event(obj.kind, obj.name, "Ready",
                                 f"{rec.id} answers on port {rec.host_port}", replica_id=rec.id)
            return rec
        if status.state is ReplicaState.CREATED and rec.state == PENDING:
            # the daemon died between recording and starting it
            self._start(obj, rec.id, driver, "Started")
            return rec
        return self._crashed(obj, rec, driver, status.detail or status.state.value,
                             status.exit_status, _started_seconds_ago(started_at))

    def _crashed(self, obj: ObjectRecord, rec: ReplicaRecord, driver: Driver, detail: str,
                 exit_status: int | None, lived: float | None) -> ReplicaRecord:
        now = time.time()
        if rec.state not in (CRASHED, CRASH_LOOP):
            quick = lived is not None and lived < QUICK_FAILURE
            state = CRASH_LOOP if quick and rec.restarts + 1 >= CRASH_LOOP_AFTER else CRASHED
            why = f"exit status {exit_status}" if exit_status is not None else detail
            with self.store.tx() as tx:
                rec = tx.update_replica(rec.id, state=state, last_error=why,
                                        next_restart_at=tx.now + backoff(rec.restarts))
                tx.add_event(obj.kind, obj.name, "Died" if state == CRASHED else "CrashLoop",
                             f"{rec.id} stopped ({why}); restart in "
                             f"{backoff(rec.restarts):.0f} s", type="Warning",
                             replica_id=rec.id)
        if rec.next_restart_at is not None and rec.next_restart_at > now:
            return rec
        with self.store.tx() as tx:
            rec = tx.update_replica(rec.id, restarts=rec.restarts + 1)
        self._start(obj, rec.id, driver, "Restarted")
        with self.store.tx(readonly=True) as tx:
            fresh = tx.get_replica(rec.id)
        return fresh or rec

    def _remove(self, obj: ObjectRecord, rec: ReplicaRecord, why: str) -> None:
        driver = self._driver(rec.driver)
        with contextlib.suppress(ReplicaNotFoundError):
            driver.stop(rec.id, timeout=10)
            driver.remove(rec.id, force=True)
        with self.store.tx() as tx:
            tx.remove_replica(rec.id)
            tx.add_event(obj.kind, obj.name, "ReplicaRemoved", f"{rec.id}: {why}",
                         replica_id=rec.id)

    def _event(self, obj: ObjectRecord, reason: str, message: str) -> None:
        with self.store.tx() as tx:
            _add_event(tx, obj, reason, message)


def _add_event(tx: Tx, obj: ObjectRecord, reason: str, message: str) -> None:
    if tx.get_object(obj.kind, obj.name, include_deleted=True) is not None:
        tx.add_event(obj.kind, obj.name, reason, message)
