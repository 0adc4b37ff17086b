"""Make what runs match what was applied: serial per object, objects in parallel.

The store says what is desired (applied objects, their revisions and
rollouts) and what the control plane believes it started (the ``replicas``
table); the drivers say what really runs. Each object's pass compares the
three and acts, so the reconciler holds no state worth keeping: a daemon
killed at any point and started again reads the same tables, finds its
replicas and endpoints still running (they live in their own sessions) and
carries on without starting duplicates.

Order of writes: a replica is recorded in the store right after the driver
creates it on disk and *before* it is started, so a crash can leave a record
whose process never ran (cleaned up by the next pass), never a running
process nobody knows about. A replica leaves the endpoint (drained: no new
requests, those in flight finish) before it is stopped, so retiring one
during a rollout or a scale-down fails no request.

One pass of one object:

1. record the spec's revision and, if it is new, start a rollout;
2. make sure the revision's image exists (build it if not);
3. observe every replica: readiness and liveness probes, restarts with a
   doubling back-off, a visible crash-loop state;
4. if the rollout's new replicas fail (die repeatedly, or are not ready
   within ``progressDeadlineSeconds``), apply the previous revision again;
5. ask :mod:`.planner` what to create and retire (scale, rolling, canary)
   towards the fixed count or, under ``autoscaling``, the count the
   service's decider wants (:mod:`.autoscaling`), tell the endpoint, act,
   and record how far the rollout got.

Objects are reconciled on a thread pool, one task per object at a time, so
an image build for one service does not hold up restarts of another.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from uniframe.build.images import build_image
from uniframe.build.store import Image, ImageStore
from uniframe.control import planner
from uniframe.control.autoscaler import Decision, Settings
from uniframe.control.autoscaling import Autoscalers, Load, describe_change
from uniframe.control.endpoints import Endpoints, activation_of
from uniframe.control.health import Liveness
from uniframe.control.hostpaths import PathPolicy
from uniframe.control.proxy import Backend
from uniframe.control.rollouts import revision_digest, wanted_replicas, with_revision
from uniframe.control.states import (
    COMPLETE,
    CRASH_LOOP,
    CRASHED,
    FAILED,
    PAUSED,
    PENDING,
    PROGRESSING,
    PROMOTED,
    READY,
    ROLLED_BACK,
    STARTING,
)
from uniframe.control.store import ObjectRecord, ReplicaRecord, RolloutRecord, Store, Tx
from uniframe.control.targets import Rules, Target, rules_of, service_target, workload_target
from uniframe.control.templates import Templates
from uniframe.errors import SpecError, UniframeError, is_permanent
from uniframe.paths import state_dir
from uniframe.runtime.driver import Driver, ReplicaNotFoundError
from uniframe.runtime.registry import REGISTRY, Registry
from uniframe.runtime.replica import ReplicaState
from uniframe.spec import RUNTIMES, InferenceService, Workload, load_data

__all__ = ["READY", "RUN_KINDS", "SERVICE_KIND", "WORKLOAD_KIND", "PassResult", "Reconciler",
           "backoff", "build_backoff"]

SERVICE_KIND = "InferenceService"
WORKLOAD_KIND = "Workload"
RUN_KINDS = (SERVICE_KIND, WORKLOAD_KIND)
BACKOFF_BASE = 1.0
BACKOFF_MAX = 60.0
CRASH_LOOP_AFTER = 3
QUICK_FAILURE = 30.0
ROLLBACK_AFTER_DEATHS = 2  # a new replica that dies this often fails its rollout
DRAIN_WAIT = 30.0          # seconds a retiring replica may take to finish its requests
STOP_TIMEOUT = 10.0
HUNG_STOP_TIMEOUT = 2.0    # a replica failing its health checks gets less time to stop
BUILD_RETRY_FIRST = 10.0   # seconds before a failed image build is tried again, doubling...
BUILD_RETRY_MAX = 300.0    # ...up to this


def backoff(restarts: int) -> float:
    """Seconds to wait before restart number ``restarts + 1``."""
    return float(min(BACKOFF_MAX, BACKOFF_BASE * 2 ** max(0, restarts)))


def build_backoff(failures: int) -> float:
    """Seconds to wait after failed build number ``failures + 1`` of one revision's image,
    and after failed pass number ``failures + 1`` of one object (a temporary failure).

    A build that failed (a model that does not load, a full disk) fails the
    same way when tried again at once, at a full build's cost each time, so
    retries wait 10 s doubling to 5 min; a changed spec is another revision
    and builds at once. A permanent failure is not retried at all until the
    spec changes (see :func:`uniframe.errors.is_permanent`).
    """
    return float(min(BUILD_RETRY_MAX, BUILD_RETRY_FIRST * 2 ** max(0, failures)))


def _started_seconds_ago(started_at: str | None) -> float | None:
    if not started_at:
        return None
    with contextlib.suppress(ValueError):
        return time.time() - datetime.fromisoformat(started_at).timestamp()
    return None


def _group(revision: str) -> str:
    """The endpoint's traffic group of a revision: a short, stable name."""
    return revision.removeprefix("sha256:")[:12] or "default"


@dataclass
class _Build:
    """One revision's image build: the attempt under way or last finished, and the failed
    attempts before it (kept in memory: a new daemon tries once at once)."""

    ref: str                     # the object it is built for
    attempt: Future[Image]
    failures: int = 0            # failed attempts reported so far, in a row
    retry_at: float | None = None  # set once the attempt's failure is reported: when to retry
    #                              (math.inf: a permanent failure, until the spec changes)
    generation: int = 0          # of the spec it was built for


@dataclass
class _Trouble:
    """An object whose last pass failed: why, and when it may run again.

    Kept in memory, as the builds are: a new daemon tries every object once at once.
    """

    generation: int   # of the spec that failed; a changed spec runs at once
    cause: str        # the failure as reported: one event per cause, not one per attempt
    failures: int     # passes failed in a row at this generation
    retry_at: float   # monotonic; math.inf for a permanent failure (held until the spec changes)


def _starting_point(rollout: RolloutRecord | None) -> str:
    """The revision a new rollout starts from, after ``rollout`` (the object's latest)."""
    if rollout is None:
        return ""
    if rollout.state == COMPLETE:
        return rollout.to_digest
    return rollout.from_digest or rollout.to_digest


@dataclass
class PassResult:
    """What one pass did, for logs and tests."""

    objects: int = 0
    errors: int = 0


class Reconciler:
    """Drive every applied InferenceService towards its spec through the runtime drivers."""

    def __init__(self, store: Store, *, state_root: Path | None = None,
                 build_store: ImageStore | None = None,
                 log: Callable[[str], None] | None = None,
                 endpoints: Endpoints | None = None, endpoint_host: str = "127.0.0.1",
                 workers: int = 4, paths: PathPolicy | None = None,
                 registry: Registry | None = None) -> None:
        self.store = store
        # Every driver comes from here: the real registry, or one a test builds around a fake.
        self.registry = registry or REGISTRY
        # Checked again at every pass, not only at apply: a store written by an older daemon,
        # or one started with other --allow-path roots, must not make this one read a host
        # file or load a pickle. By default any path, but never a pickle.
        self.paths = paths or PathPolicy.of([Path("/")])
        self.state_root = state_root
        self.images = build_store or ImageStore()
        self.log = log or (lambda _m: None)
        self.endpoints = endpoints or Endpoints(
            store, state_root / "endpoints" if state_root else None, host=endpoint_host)
        # An endpoint holding requests with no ready replica wakes the loop now, not next period.
        self.endpoints.on_demand(self.wake_service)
        self.liveness = Liveness()
        self._image_cache: dict[tuple[str, str], Image] = {}
        self._trouble: dict[str, _Trouble] = {}  # object ref -> its last pass's failure
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile")
        self._inflight: dict[str, Future[bool]] = {}
        self._builds: dict[tuple[str, str], _Build] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # One decider per autoscaled service, sampled from its endpoint on a thread of its own
        # (started by run; tests call autoscalers.sample()).
        self.autoscalers = Autoscalers(self._endpoint_load, changed=self._scaled)
        # Snapshot templates of autoscaled services on snapshot-capable drivers (templates.py).
        # Under the state root the drivers use (the user's state dir without one), so a new
        # daemon finds them.
        self.templates = Templates(store, (state_root or state_dir()) / "templates",
                                   self.registry, self.driver, self.log)
        self.passes = 0
        self.last_pass_seconds = 0.0  # of the last whole pass over every object (see _time_pass)
        self.errors = 0

    def driver(self, kind: str) -> Driver:
        """The driver of ``kind`` from this reconciler's registry (the daemon's API asks here too)."""
        return self.registry.driver_for(kind, self.state_root / "replicas" if self.state_root else None)

    # -- the loop ----------------------------------------------------------------------------

    def wake(self) -> None:
        """Run the next pass now (an object was applied, deleted, promoted...)."""
        self._wake.set()

    def wake_service(self, name: str) -> None:
        """A request waits at ``name``'s endpoint with no replica ready (the activator's call):
        an autoscaled service wants a replica at once, and every object gets a pass now."""
        self.autoscalers.poke(name)
        self.wake()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self, period: float = 1.0) -> None:
        """Dispatch passes until :meth:`stop`; then wait for those running and let go of endpoints."""
        threading.Thread(target=self.autoscalers.run, args=(self._stop, self.log),
                         name="autoscaler", daemon=True).start()
        try:
            while not self._stop.is_set():
                self._dispatch()
                self._wake.wait(period)
                self._wake.clear()
        finally:
            self.close()

    def close(self) -> None:
        """Finish the passes under way; the replicas and endpoints keep running."""
        self._pool.shutdown(wait=True)
        self.endpoints.close()

    def _dispatch(self) -> list[Future[bool]]:
        """Start a pass for every object that has none running; return the started ones."""
        began = time.monotonic()
        with self.store.tx(readonly=True) as tx:
            objects = [o for o in tx.list_objects(include_deleted=True)
                       if o.kind in RUN_KINDS and not self._waiting(o, began)]
        started: list[Future[bool]] = []
        with self._lock:
            for obj in objects:
                running = self._inflight.get(obj.ref)
                if running is not None and not running.done():
                    continue
                future = self._pool.submit(self._reconcile_guarded, obj)
                self._inflight[obj.ref] = future
                started.append(future)
        self.passes += 1
        if len(started) == len(objects):
            self._time_pass(began, started)
        return started

    def _time_pass(self, began: float, futures: list[Future[bool]]) -> None:
        """Set ``last_pass_seconds`` once the last object of a whole pass is done.

        Objects are reconciled in parallel, so one object's time says nothing
        about the pass. Only a dispatch that started every object is a whole
        pass: one that skipped objects still busy from an earlier dispatch
        would report the quick objects and hide the slow one.
        """
        if not futures:  # no objects at all
            self.last_pass_seconds = time.monotonic() - began
            return
        left = len(futures)
        lock = threading.Lock()

        def one_done(_future: Future[bool]) -> None:
            nonlocal left
            with lock:
                left -= 1
                if left:
                    return
            self.last_pass_seconds = time.monotonic() - began

        for future in futures:
            future.add_done_callback(one_done)

    def reconcile_once(self) -> PassResult:
        """One complete pass over every object (live or deleted), waiting for all of them.

        An object whose failure's back-off still runs, or that a permanent failure holds
        (and whose spec has not changed since), sits the pass out, as under :meth:`run`.
        """
        with self._lock:
            running = list(self._inflight.values())
        wait_all(running)
        futures = self._dispatch()
        wait_all(futures)
        return PassResult(objects=len(futures), errors=sum(not f.result() for f in futures))

    def _reconcile_guarded(self, obj: ObjectRecord) -> bool:
        """One object's pass; its failure is reported once as an event and stays its own."""
        try:
            self.reconcile_object(obj)
        except Exception as exc:  # a bug must not kill the loop either: it is a failure too
            self._failed(obj, exc)
            return False
        self._trouble.pop(obj.ref, None)
        return True

    def _waiting(self, obj: ObjectRecord, now: float) -> bool:
        """Whether ``obj`` sits out a pass begun at ``now`` (monotonic): its last failure's
        back-off runs, or a permanent failure holds it, and its spec has not changed since."""
        trouble = self._trouble.get(obj.ref)
        return (trouble is not None and trouble.generation == obj.generation
                and now < trouble.retry_at)

    def _failed(self, obj: ObjectRecord, exc: Exception) -> None:
        """Report a failed pass and decide when the object runs again (kopf's two kinds).

        Temporary, the default (:func:`~uniframe.errors.is_permanent` says why an
        unknown exception counts as one): the object runs again after
        :func:`build_backoff`, 10 s doubling to 5 min, or at once when its spec
        changes; its replicas keep their own restart back-off meanwhile. Permanent
        (a spec the policy refuses, a model the registry does not have...): the
        object is failed (a Warning event, its rollout ``failed`` with the cause,
        so ``get`` and ``describe`` say why) and sits out every pass until its
        generation changes. A deleted object is never held: it must go, so
        whatever stops its removal is retried.
        """
        cause = (str(exc) if isinstance(exc, UniframeError)
                 else f"internal error: {type(exc).__name__}: {exc}")[:2000]
        permanent = is_permanent(exc) and not obj.deleted
        prior = self._trouble.get(obj.ref)
        again = prior is not None and prior.generation == obj.generation
        failures = prior.failures + 1 if prior is not None and again else 1
        if permanent:
            retry_at = math.inf
            message = f"{cause}; not retried until the spec changes: fix it and apply it again"
        else:
            delay = build_backoff(failures - 1)
            retry_at = time.monotonic() + delay
            message = f"{cause}; retrying in {delay:.0f} s, or at once when a changed spec is applied"
        self._trouble[obj.ref] = _Trouble(obj.generation, cause, failures, retry_at)
        self.errors += 1
        self.log(f"{obj.ref}: {message}")
        if again and prior is not None and prior.cause == cause:
            return  # the same failure again: one event, not one per attempt
        with contextlib.suppress(UniframeError), self.store.tx() as tx:
            current = tx.get_object(obj.kind, obj.name, include_deleted=True)
            if current is None:
                return
            tx.add_event(obj.kind, obj.name, "ReconcileFailed", message, type="Warning")
            if permanent and current.generation == obj.generation:
                self._fail_revision(tx, obj, message)

    @staticmethod
    def _fail_revision(tx: Tx, obj: ObjectRecord, message: str) -> None:
        """Mark the rollout to the object's current spec ``failed`` with ``message``, starting
        one if the pass failed before it could (a spec refused before its revision counts)."""
        digest = revision_digest(obj.spec)
        rollout = tx.get_rollout(obj.kind, obj.name)
        if rollout is not None and rollout.to_digest == digest:
            tx.update_rollout(obj.kind, obj.name, state=FAILED, message=message)
            return
        tx.start_rollout(obj.kind, obj.name, strategy="rolling",
                         from_digest=_starting_point(rollout), to_digest=digest, state=FAILED,
                         traffic_percent=None, message=message)

    # -- one object --------------------------------------------------------------------------

    def reconcile_object(self, obj: ObjectRecord) -> None:
        if obj.deleted:
            self._delete(obj)
            return
        doc = load_data(obj.spec, obj.ref).spec
        assert isinstance(doc, InferenceService | Workload)
        refused = self.paths.check(doc)
        if refused:
            raise SpecError("; ".join(f"{p.path}: {p.message}" for p in refused))
        digest = revision_digest(obj.spec)
        with self.store.tx() as tx:
            earlier = {r.digest for r in tx.list_revisions(obj.kind, obj.name)[:-1]}
            number = tx.record_revision(obj.kind, obj.name, digest, obj.spec).number
            replicas = tx.list_replicas(obj.kind, obj.name)
            rollout = self._track_rollout(tx, obj, rules_of(doc), digest, replicas,
                                          returning=digest in earlier)
        if isinstance(doc, InferenceService):
            image = self._image(obj, doc, digest)
            kind = self.registry.entry_for_runtime(doc.spec.runtime).kind
            target = service_target(doc, image, kind,
                                    snapshottable=self.templates.wanted(doc, kind))
            if image is None:  # being built: keep the running replicas healthy meanwhile
                running = [r for r in (self._observe(obj, target, rec) for rec in replicas)
                           if r is not None]
                error = self._sync_endpoint(obj, target, running, None)
                if error is not None:
                    raise error
                return
        else:
            target = workload_target(doc, digest,
                                     self.registry.entry_for_runtime(doc.spec.runtime).kind)

        live: list[ReplicaRecord] = []
        for rec in replicas:
            if (not rec.revision and rec.image_digest == target.image_digest
                    and rec.driver == target.driver_kind):
                with self.store.tx() as tx:  # recorded before revisions existed: adopt it
                    rec = tx.update_replica(rec.id, revision=digest)
            seen = self._observe(obj, target, rec)
            if seen is not None:
                live.append(seen)
        new = [r for r in live if r.revision == digest and r.image_digest == target.image_digest
               and r.driver == target.driver_kind]
        old = [r for r in live if r not in new]
        if isinstance(doc, InferenceService):  # before the endpoint hears a new replica is ready
            self.templates.keep_up(obj, target, digest, new, live)

        if rollout.state in (PROGRESSING, PAUSED, PROMOTED, FAILED):
            failure = self._failure(target.rules.deadline, new)
            if failure is not None and rollout.from_digest:
                self._roll_back(obj, rollout, failure)
                self._sync_endpoint(obj, target, live, None)
                return
            if failure is not None:
                rollout = self._fail(obj, rollout, failure)  # a first deployment: no way back

        want = self._wanted(obj, doc, new, old)
        canary_on = (rollout.strategy == "canary" and rollout.state in (PROGRESSING, PAUSED)
                     and target.endpoint)
        percent = rollout.traffic_percent or 0
        if not old:
            step = planner.scale(want, new)
        elif canary_on:
            step = planner.canary(want, percent, new, old)
        else:
            rules = target.rules
            step = planner.rolling(
                want, planner.resolve(rules.max_surge, want, round_up=True),
                planner.resolve(rules.max_unavailable, want, round_up=False), new, old)
        weights = (planner.weights(percent, _group(digest),
                                   sorted({_group(r.revision) for r in old}))
                   if canary_on and old else None)

        endpoint_error = self._sync_endpoint(obj, target, live, weights)
        for rec in step.remove:
            self._retire(obj, rec, "scaled down" if rec in new else
                         f"replaced by revision {number}")
        for _ in range(step.create):
            self._create(obj, target, digest)
        with self.store.tx(readonly=True) as tx:
            replicas = tx.list_replicas(obj.kind, obj.name)
        endpoint_error = self._sync_endpoint(obj, target, replicas, weights) or endpoint_error
        self._progress(obj, rollout, digest, want, replicas)
        if endpoint_error is not None:
            raise endpoint_error

    def _delete(self, obj: ObjectRecord) -> None:
        with self.store.tx(readonly=True) as tx:
            replicas = tx.list_replicas(obj.kind, obj.name)
        for rec in replicas:
            self._retire(obj, rec, "object deleted")
        if obj.kind == SERVICE_KIND:
            self.autoscalers.forget(obj.name)
            self.templates.retire(obj.name, keep=set())
            self.endpoints.remove(obj.name)
        with self._lock:  # the same spec applied again later builds at once, not after a back-off
            for key in [k for k, b in self._builds.items()
                        if b.ref == obj.ref and b.attempt.done()]:
                del self._builds[key]
        with self.store.tx() as tx:
            current = tx.get_object(obj.kind, obj.name, include_deleted=True)
            if current is not None and current.deleted and not tx.list_replicas(obj.kind, obj.name):
                tx.purge_object(obj.kind, obj.name)

    # -- autoscaling -------------------------------------------------------------------------

    def _wanted(self, obj: ObjectRecord, doc: InferenceService | Workload,
                new: Sequence[ReplicaRecord], old: Sequence[ReplicaRecord]) -> int:
        """Replicas the planner aims for: the fixed count, or the autoscaler's decision.

        A decider new to a service (first pass, or a new daemon) takes over what runs:
        the larger of the two revisions' counts, which during a rollout is the count
        before it began, without the surge.
        """
        scaling = doc.spec.autoscaling if isinstance(doc, InferenceService) else None
        if scaling is None:
            self.autoscalers.forget(obj.name)
            return wanted_replicas(obj.spec)
        ready = sum(r.state == READY for r in (*new, *old))
        return self.autoscalers.track(obj.name, Settings.of(scaling),
                                      running=max(len(new), len(old)), ready=ready)

    def _endpoint_load(self, service: str) -> Load | None:
        """The service endpoint's load for its decider; None while it has no endpoint."""
        status = self.endpoints.status(service)
        if status is None:
            return None
        return Load(in_flight=status.in_flight + status.held, requests=status.requests)

    def _scaled(self, service: str, before: int, decision: Decision, settings: Settings) -> None:
        """The desired count changed: say so (ScaledUp, ScaledDown, ScaledToZero) and act now."""
        self.wake()  # first: the pass need not wait for the event's commit (a cold start counts ms)
        reason, message = describe_change(service, before, decision, settings)
        self.log(f"{SERVICE_KIND}/{service}: {message}")
        with contextlib.suppress(UniframeError), self.store.tx() as tx:
            if tx.get_object(SERVICE_KIND, service) is not None:
                tx.add_event(SERVICE_KIND, service, reason, message)

    # -- rollouts ----------------------------------------------------------------------------

    def _track_rollout(self, tx: Tx, obj: ObjectRecord, rules: Rules, digest: str,
                       replicas: Sequence[ReplicaRecord], *, returning: bool) -> RolloutRecord:
        """The object's rollout towards ``digest``, started here if the spec's revision is new.

        Going back to a revision that ran before (an undo) is a rolling update
        even under a canary strategy: it is known to work, and whoever undoes
        wants it back everywhere, not on a share of the traffic.
        """
        rollout = tx.get_rollout(obj.kind, obj.name)
        if rollout is not None and rollout.to_digest == digest:
            return rollout
        if rollout is not None and rollout.state == ROLLED_BACK and rollout.from_digest == digest:
            return rollout  # the rollback is in effect: retire the failed replicas, nothing new
        numbers = {r.digest: r.number for r in tx.list_revisions(obj.kind, obj.name)}
        has_old = any(r.revision != digest for r in replicas)
        start_from = _starting_point(rollout)
        strategy = rules.strategy if has_old and not returning else "rolling"
        percent = rules.traffic_percent if strategy == "canary" else None
        how = (f"canary taking {percent}% of requests" if percent is not None else
               f"rolling, maxSurge {rules.max_surge}, maxUnavailable {rules.max_unavailable}")
        target = numbers.get(digest)
        message = (f"revision {target}: {how}" if has_old or start_from
                   else f"revision {target}: first deployment")
        rollout = tx.start_rollout(obj.kind, obj.name, strategy=strategy, from_digest=start_from,
                                   to_digest=digest, state=PROGRESSING, traffic_percent=percent,
                                   message=message)
        tx.add_event(obj.kind, obj.name, "RolloutStarted",
                     message + (f" (from revision {numbers[start_from]})"
                                if start_from in numbers else ""))
        return rollout

    def _failure(self, deadline: float, new: Sequence[ReplicaRecord]) -> str | None:
        """Why the rollout's new replicas count as failed, or None while they may still come up."""
        now = time.time()
        for r in new:
            if r.state == CRASH_LOOP or (r.state == CRASHED and r.restarts + 1 >= ROLLBACK_AFTER_DEATHS):
                return f"new replica {r.id} keeps dying ({r.last_error or 'no detail'})"
            if r.state != READY and now - r.created_at > deadline:
                return (f"new replica {r.id} was not ready within {deadline:g} s "
                        "(rollout.progressDeadlineSeconds)")
        return None

    def _roll_back(self, obj: ObjectRecord, rollout: RolloutRecord, why: str) -> None:
        with self.store.tx() as tx:
            current = tx.get_object(obj.kind, obj.name)
            if current is None or current.generation != obj.generation:
                return  # the user changed the spec meanwhile; the next pass sees the new one
            target = next((r for r in tx.list_revisions(obj.kind, obj.name)
                           if r.digest == rollout.from_digest), None)
            if target is None:
                self._fail_in(tx, obj, rollout, why)
                return
            tx.apply_object(obj.kind, obj.name, with_revision(current.spec, target.spec))
            tx.update_rollout(obj.kind, obj.name, state=ROLLED_BACK,
                              message=f"{why}; rolled back to revision {target.number}")
            tx.add_event(obj.kind, obj.name, "RolloutFailed", why, type="Warning")
            tx.add_event(obj.kind, obj.name, "RolledBack",
                         f"applied revision {target.number} again")
        self.wake()

    def _fail(self, obj: ObjectRecord, rollout: RolloutRecord, why: str) -> RolloutRecord:
        with self.store.tx() as tx:
            if tx.get_object(obj.kind, obj.name) is not None:
                self._fail_in(tx, obj, rollout, why)
            return tx.get_rollout(obj.kind, obj.name) or rollout

    @staticmethod
    def _fail_in(tx: Tx, obj: ObjectRecord, rollout: RolloutRecord, why: str) -> None:
        """Mark the rollout failed once; its replicas keep being retried with back-off."""
        if rollout.state == FAILED:
            return
        tx.update_rollout(obj.kind, obj.name, state=FAILED,
                          message=f"{why}; no earlier revision to roll back to, so its replicas "
                                  "keep being retried: fix the spec and apply it again")
        tx.add_event(obj.kind, obj.name, "RolloutFailed", why, type="Warning")

    def _progress(self, obj: ObjectRecord, rollout: RolloutRecord, digest: str, want: int,
                  replicas: Sequence[ReplicaRecord]) -> None:
        """Move the rollout on (paused canary, complete) and keep its message current."""
        if rollout.to_digest != digest or rollout.state not in (PROGRESSING, PROMOTED, PAUSED,
                                                                  FAILED):
            return
        new = [r for r in replicas if r.revision == digest]
        ready = sum(r.state == READY for r in new)
        old = len(replicas) - len(new)
        state, reason = rollout.state, ""
        if old == 0 and len(new) == want and ready == want:
            state, reason = COMPLETE, "RolloutComplete"
            message = f"{ready} of {want} replicas ready"
        elif rollout.strategy == "canary" and rollout.state == PROGRESSING and old and (
                ready >= planner.canary_count(want, rollout.traffic_percent or 0)):
            state, reason = PAUSED, "CanaryReady"
            message = (f"canary ready: {ready} replica(s) take {rollout.traffic_percent}% of "
                       f"requests; `uniframe rollout promote {obj.name}` or "
                       f"`uniframe rollout undo {obj.name}`")
        elif rollout.state in (PAUSED, FAILED):
            return  # a paused canary waits for the user; a failed rollout keeps its reason
        else:
            message = f"{ready} of {want} updated replicas ready, {old} old left"
        if state == rollout.state and message == rollout.message:
            return
        with self.store.tx() as tx:
            if tx.get_object(obj.kind, obj.name) is None:
                return
            tx.update_rollout(obj.kind, obj.name, state=state, message=message)
            if reason:
                tx.add_event(obj.kind, obj.name, reason, message)

    # -- images and replicas -----------------------------------------------------------------

    def _image(self, obj: ObjectRecord, service: InferenceService, digest: str) -> Image | None:
        """The image built from this revision; None while it is being built or failed to build.

        Builds run on their own thread, so an object's passes go on observing,
        restarting and serving its running replicas during a build that takes
        minutes; the finished build wakes the loop. A failed attempt is
        reported once (an event naming the cause, the rollout ``failed``,
        the error counter) and tried again after :func:`build_backoff`, not
        on every pass, or never while the spec stays the same if the failure
        is permanent; a changed spec is another revision and builds at once.
        """
        runtime = service.spec.runtime
        key = (digest, runtime)
        cached = self._image_cache.get(key)
        if cached is not None and cached.dir.is_dir():
            return cached
        for image in self.images.list():
            if (image.manifest.get("source_spec_digest") == digest
                    and image.kind == RUNTIMES[runtime].image_kind):
                self._image_cache[key] = image
                return image
        with self._lock:
            build = self._builds.get(key)
            start = build is None or (build.retry_at is not None and (
                time.monotonic() >= build.retry_at or build.generation != obj.generation))
            if start:
                build = _Build(obj.ref, Future(), failures=build.failures if build else 0,
                               generation=obj.generation)
                self._builds[key] = build
        assert build is not None
        if start:
            again = f" (attempt {build.failures + 1})" if build.failures else ""
            self._event(obj, "Building", f"building the {runtime} image{again}")
            threading.Thread(target=self._build, args=(build.attempt, obj, service, digest),
                             name=f"build-{obj.name}", daemon=True).start()
            return None
        if not build.attempt.done():
            return None
        failure = build.attempt.exception()
        if failure is not None:
            if build.retry_at is None:  # this attempt's failure is not reported yet
                delay = math.inf if is_permanent(failure) else build_backoff(build.failures)
                self._build_failed(obj, digest, runtime, failure, delay)
                build.failures += 1
                build.retry_at = time.monotonic() + delay
            return None
        with self._lock:
            self._builds.pop(key, None)
        image = build.attempt.result()
        self._image_cache[key] = image
        if build.failures:
            self._build_recovered(obj, digest, build.failures)
        return image

    def _build_failed(self, obj: ObjectRecord, digest: str, runtime: str,
                      failure: BaseException, retry_in: float) -> None:
        """Report one failed build: a Warning event naming the cause, the error counter, and the
        rollout to this revision ``failed`` with the cause (no replica of it can exist), so
        ``get`` and ``describe`` say why nothing runs."""
        cause = str(failure) if isinstance(failure, UniframeError) else (
            f"internal error: {type(failure).__name__}: {failure}")
        when = ("not retried until the spec changes: fix it and apply it again"
                if math.isinf(retry_in) else
                f"retrying in {retry_in:.0f} s, or at once when a changed spec is applied")
        message = f"the {runtime} image failed to build: {cause[:2000]}; {when}"
        self.errors += 1
        self.log(f"{obj.ref}: {message}")
        with self.store.tx() as tx:
            if tx.get_object(obj.kind, obj.name) is None:
                return
            tx.add_event(obj.kind, obj.name, "BuildFailed", message, type="Warning")
            rollout = tx.get_rollout(obj.kind, obj.name)
            if rollout is not None and rollout.to_digest == digest:
                tx.update_rollout(obj.kind, obj.name, state=FAILED, message=message)

    def _build_recovered(self, obj: ObjectRecord, digest: str, failures: int) -> None:
        """A build that failed before succeeded: the rollout it failed goes on."""
        with self.store.tx() as tx:
            rollout = tx.get_rollout(obj.kind, obj.name)
            if (tx.get_object(obj.kind, obj.name) is not None and rollout is not None
                    and rollout.to_digest == digest and rollout.state == FAILED):
                tx.update_rollout(obj.kind, obj.name, state=PROGRESSING,
                                  message=f"image built after {failures} failed attempt(s)")

    def _build(self, result: Future[Image], obj: ObjectRecord, service: InferenceService,
               digest: str) -> None:
        """One build on its own daemon thread: a daemon that stops does not wait for it (the
        next one builds again; the store only ever holds finished images)."""
        began = time.monotonic()
        try:
            image = build_image(service, source_digest=digest, runtime=service.spec.runtime,
                                store=self.images)
            with contextlib.suppress(UniframeError):
                self._event(obj, "Built",
                            f"image {image.short} in {time.monotonic() - began:.1f} s")
            result.set_result(image)
        except BaseException as exc:
            result.set_exception(exc)
        finally:
            self.wake()

    def _create(self, obj: ObjectRecord, target: Target, revision: str) -> None:
        """Create and start one replica; restored from the revision's template if it has one
        (then it runs already: recorded as starting, so a crash between the restore and the
        record leaves a clone the store does not know, the price of a one-step restore)."""
        driver = self.driver(target.driver_kind)
        made = self.templates.make(obj, target, revision, driver)
        replica, port = made.replica, made.port
        try:
            with self.store.tx() as tx:
                tx.add_replica(replica.id, obj.kind, obj.name, driver=target.driver_kind,
                               image_digest=target.image_digest,
                               state=STARTING if made.restored_from else PENDING,
                               host_port=port, revision=revision)
                tx.add_event(obj.kind, obj.name, "ReplicaCreated",
                             f"{replica.id}" + (f" on port {port}" if port else ""),
                             replica_id=replica.id)
                if made.restored_from is not None:
                    tx.add_event(obj.kind, obj.name, "Restored",
                                 f"replica {replica.id} from template {made.restored_from.id}",
                                 replica_id=replica.id)
        except BaseException:
            with contextlib.suppress(UniframeError):
                driver.remove(replica.id, force=True)
            raise
        if made.restored_from is None:
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

    def _observe(self, obj: ObjectRecord, target: Target,
                 rec: ReplicaRecord) -> ReplicaRecord | None:
        """Bring one recorded replica's state up to date; None if it was cleaned away."""
        driver = self.driver(rec.driver)
        try:
            status = driver.reap(rec.id)  # an end seen here is recorded, its resources released
            started_at = driver.get(rec.id).started_at
        except ReplicaNotFoundError:
            with self.store.tx() as tx:
                tx.remove_replica(rec.id)
                tx.add_event(obj.kind, obj.name, "ReplicaLost",
                             f"{rec.id} is gone from the host; replacing it", type="Warning",
                             replica_id=rec.id)
            return None
        if status.state is ReplicaState.RUNNING:
            return self._check_health(obj, target, rec, driver)
        if status.state is ReplicaState.CREATED and rec.state == PENDING:
            # the daemon died between recording and starting it
            self._start(obj, rec.id, driver, "Started")
            return rec
        return self._crashed(obj, rec, driver, status.detail or status.state.value,
                             status.exit_status, _started_seconds_ago(started_at))

    def _check_health(self, obj: ObjectRecord, target: Target, rec: ReplicaRecord,
                      driver: Driver) -> ReplicaRecord:
        """Readiness until the replica is ready, then liveness every ``periodSeconds``."""
        health = target.health
        if rec.state != READY:
            if target.probe(rec):
                self.liveness.observe(rec.id, True, health.period)
                with self.store.tx() as tx:
                    rec = tx.update_replica(rec.id, state=READY, last_error="")
                    where = f" on port {rec.host_port}" if rec.host_port else ""
                    tx.add_event(obj.kind, obj.name, "Ready", f"{rec.id} answers{where}",
                                 replica_id=rec.id)
            return rec
        if not self.liveness.due(rec.id):
            return rec
        failures = self.liveness.observe(rec.id, target.probe(rec), health.period)
        if failures < health.failure_threshold:
            return rec
        why = (f"{failures} health checks in a row failed ({health.describe}, "
               f"timeout {health.timeout:g} s)")
        self.endpoints.drain(obj.name, rec.id, wait=0)
        with contextlib.suppress(UniframeError):
            driver.stop(rec.id, timeout=HUNG_STOP_TIMEOUT)
        self.liveness.forget(rec.id)
        with self.store.tx() as tx:
            rec = tx.update_replica(rec.id, state=STARTING, last_error=why,
                                    restarts=rec.restarts + 1)
            tx.add_event(obj.kind, obj.name, "LivenessFailed", f"{rec.id}: {why}; restarting",
                         type="Warning", replica_id=rec.id)
        self._start(obj, rec.id, driver, "Restarted")
        with self.store.tx(readonly=True) as tx:
            return tx.get_replica(rec.id) or rec

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

    def _retire(self, obj: ObjectRecord, rec: ReplicaRecord, why: str) -> None:
        """Take a replica out of the endpoint, let its requests finish, then stop and remove it."""
        if rec.state == READY:
            self.endpoints.drain(obj.name, rec.id, wait=DRAIN_WAIT)
        driver = self.driver(rec.driver)
        with contextlib.suppress(ReplicaNotFoundError):
            driver.stop(rec.id, timeout=STOP_TIMEOUT)
            driver.remove(rec.id, force=True)
        self.liveness.forget(rec.id)
        with self.store.tx() as tx:
            tx.remove_replica(rec.id)
            tx.add_event(obj.kind, obj.name, "ReplicaRemoved", f"{rec.id}: {why}",
                         replica_id=rec.id)

    def _sync_endpoint(self, obj: ObjectRecord, target: Target,
                       replicas: Sequence[ReplicaRecord],
                       weights: dict[str, int] | None) -> UniframeError | None:
        """Tell the endpoint the replicas; a failure is returned, so replicas are still managed."""
        if not target.endpoint:
            return None
        backends = [Backend(r.id, "127.0.0.1", r.host_port, group=_group(r.revision),
                            ready=r.state == READY)
                    for r in replicas if r.host_port is not None]
        try:
            self.endpoints.sync(obj.name, target.service_port, backends, weights,
                                activation_of(obj.spec))
        except UniframeError as exc:
            return exc
        return None

    def _event(self, obj: ObjectRecord, reason: str, message: str) -> None:
        with self.store.tx() as tx:
            if tx.get_object(obj.kind, obj.name, include_deleted=True) is not None:
                tx.add_event(obj.kind, obj.name, reason, message)
