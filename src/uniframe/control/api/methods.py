"""The daemon's routes as plain methods over the store, the registry and the drivers.

Nothing here knows HTTP: :mod:`uniframe.control.api.routes` maps requests to
these methods and :mod:`uniframe.control.api.server` frames the answers. The API
only reads and writes the store (and reads replica logs); everything that
starts or stops a replica happens in the reconciler, so a request never
waits on a build or a boot.

Errors: an :class:`ApiError` carries its own status; the handler maps
:class:`~uniframe.errors.NotFoundError` to 404 and
:class:`~uniframe.errors.ConflictError` to 409, so the store's and the
registry's own messages reach the user unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from http import HTTPStatus
from pathlib import Path
from typing import Any

from uniframe.control import rollouts
from uniframe.control.api.logs import LogSource, object_log, replica_log
from uniframe.control.api.uploads import Uploads
from uniframe.control.api.views import object_json, replica_json
from uniframe.control.autoscaling import ScaleStatus
from uniframe.control.hostpaths import PathPolicy
from uniframe.control.proxy import EndpointStatus
from uniframe.control.reconciler import RUN_KINDS, SERVICE_KIND, Reconciler
from uniframe.control.registry import Registry, model_ref_of
from uniframe.control.store import ObjectRecord, ReplicaRecord, Store, Tx
from uniframe.errors import NotFoundError
from uniframe.runtime.driver import Driver
from uniframe.runtime.registry import Capability
from uniframe.spec.loader import check_text


class ApiError(Exception):
    """An answer other than 2xx, with a JSON body ``{"error": ..., **extra}``."""

    def __init__(self, status: HTTPStatus, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **extra}


class _DryRun(Exception):
    """Raised to roll a dry-run apply back after it did everything else."""


def _missing(kind: str, name: str) -> NotFoundError:
    return NotFoundError(f"{kind}/{name} does not exist; see `uniframe get`")


class Api:
    """Every route of the daemon, callable without a server (the tests and the handler do)."""

    def __init__(self, store: Store, reconciler: Reconciler, *, uploads: Uploads | None = None,
                 paths: PathPolicy | None = None) -> None:
        self.store = store
        self.reconciler = reconciler
        self.registry = Registry(store)
        self.uploads = uploads or Uploads()
        self.paths = paths or PathPolicy.of([self.uploads.root])

    # -- objects -----------------------------------------------------------------------------

    def apply(self, text: str, base: Path | None = None, *,
              dry_run: bool = False) -> dict[str, Any]:
        """Validate every document, then write them all in one transaction (or none).

        ``base`` is where relative paths in the specs resolve (the client's
        spec directory). Every host path a spec names must then lie under an
        allowed root (:mod:`uniframe.control.hostpaths`): the client says
        where, not what the daemon may read. ``dry_run`` validates and
        reports what would change, writing nothing.
        """
        report = check_text(text, "<request>", base)
        errors = [{"document": p.index, "path": p.path, "message": p.message,
                   "line": p.line, "column": p.column} for p in report.problems]
        errors += [{"document": d.index, "path": p.path, "message": p.message, "line": None,
                    "column": None}
                   for d in report.documents for p in self.paths.check(d.spec)]
        errors += [{"document": d.index, "path": "kind", "line": None, "column": None,
                    "message": f"the daemon runs {' and '.join(RUN_KINDS)} objects, not {d.kind}"}
                   for d in report.documents if d.kind not in RUN_KINDS]
        if errors:
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, "the spec is not valid",
                           errors=errors)
        applied: list[dict[str, Any]] = []
        try:
            with self.store.tx() as tx:
                for doc in report.documents:
                    spec = doc.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
                    self._require_model(tx, doc.index, spec)
                    old = tx.get_object(doc.kind, doc.name)
                    obj, changed = tx.apply_object(doc.kind, doc.name, spec)
                    action = ("created" if old is None else "configured" if changed
                              else "unchanged")
                    applied.append({"kind": obj.kind, "name": obj.name,
                                    "generation": obj.generation, "changed": changed,
                                    "action": action,
                                    "revision_digest": rollouts.revision_digest(spec)})
                if dry_run:
                    raise _DryRun  # the very same writes, rolled back
        except _DryRun:
            pass
        if not dry_run:
            self.reconciler.wake()
        return {"applied": applied, "dry_run": dry_run}

    def _require_model(self, tx: Tx, index: int, spec: dict[str, Any]) -> None:
        pinned = model_ref_of(spec)
        if pinned is None:
            return
        try:
            self.registry.require(tx, *pinned)
        except NotFoundError as exc:
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc), errors=[
                {"document": index, "path": "spec.model", "message": str(exc), "line": None,
                 "column": None}]) from None

    def _object_json(self, tx: Tx, obj: ObjectRecord) -> dict[str, Any]:
        replicas = tx.list_replicas(obj.kind, obj.name)
        rollout = self._rollout_json(tx, obj) if obj.kind in RUN_KINDS else None
        endpoint = tx.get_endpoint(obj.name) if obj.kind == SERVICE_KIND else None
        out = object_json(obj, replicas, endpoint, rollout)
        out["status"]["revision_digest"] = rollouts.revision_digest(obj.spec)
        out["status"]["autoscaling"] = self._autoscaling_json(obj, out["status"]["replicas"])
        return out

    def _autoscaling_json(self, obj: ObjectRecord, summary: dict[str, Any]) -> dict[str, Any] | None:
        """An autoscaled service's bounds and its decider's figures (the desired count is the
        decider's, in memory: None until the daemon has tracked the service once)."""
        body = obj.spec.get("spec", {})
        scaling = body.get("autoscaling") if obj.kind == SERVICE_KIND else None
        if not isinstance(scaling, dict):
            return None
        scale = self.reconciler.autoscalers.status().get(obj.name)
        if scale is not None:
            summary["desired"] = scale.desired
        return {"min": int(scaling.get("min", 0)), "max": int(scaling["max"]),
                "metric": scale.metric if scale else scaling.get("metric", "concurrency"),
                "target": scale.target if scale else None,
                "desired": scale.desired if scale else None, "ready": summary["ready"],
                "observed": scale.observed if scale else None,
                "panicking": scale.panicking if scale else False}

    def _rollout_json(self, tx: Tx, obj: ObjectRecord) -> dict[str, Any]:
        """The rollout status, plus the digest it rolls to: a client waiting for the revision
        it applied compares that with the ``revision_digest`` its apply answered."""
        record = tx.get_rollout(obj.kind, obj.name)
        status = rollouts.read_status(tx, obj).to_json()
        scaled = self.reconciler.autoscalers.desired(obj.name) if obj.kind == SERVICE_KIND else None
        if scaled is not None:  # an autoscaled service rolls to the count its decider wants
            status["desired"] = scaled
        return {**status, "target_digest": record.to_digest if record is not None else None}

    def objects(self, kind: str | None = None) -> dict[str, Any]:
        with self.store.tx(readonly=True) as tx:
            return {"objects": [self._object_json(tx, o) for o in tx.list_objects(kind)]}

    def _get(self, tx: Tx, kind: str, name: str) -> ObjectRecord:
        obj = tx.get_object(kind, name)
        if obj is None:
            raise _missing(kind, name)
        return obj

    def object(self, kind: str, name: str) -> dict[str, Any]:
        with self.store.tx(readonly=True) as tx:
            obj = self._get(tx, kind, name)
            out = self._object_json(tx, obj)
            out["replicas"] = [replica_json(r) for r in tx.list_replicas(kind, name)]
            return out

    def delete(self, kind: str, name: str) -> dict[str, Any]:
        with self.store.tx() as tx:
            self._get(tx, kind, name)
            obj = tx.delete_object(kind, name)
        self.reconciler.wake()
        return {"deleted": {"kind": obj.kind, "name": obj.name, "generation": obj.generation}}

    # -- rollouts ----------------------------------------------------------------------------

    def rollout(self, kind: str, name: str) -> dict[str, Any]:
        with self.store.tx(readonly=True) as tx:
            return self._rollout_json(tx, self._get(tx, kind, name))

    def promote(self, kind: str, name: str) -> dict[str, Any]:
        promoted = rollouts.promote(self.store, kind, name)
        self.reconciler.wake()
        return promoted.to_json()

    def undo(self, kind: str, name: str, to_revision: int | None = None) -> dict[str, Any]:
        """Apply an earlier revision again; the answer is the object as it now stands."""
        obj = rollouts.undo(self.store, kind, name, to_revision)
        self.reconciler.wake()
        with self.store.tx(readonly=True) as tx:
            return self._object_json(tx, obj)

    def revisions(self, kind: str, name: str) -> dict[str, Any]:
        return {"revisions": [asdict(r) for r in rollouts.revisions(self.store, kind, name)]}

    # -- replicas and their logs ----------------------------------------------------------

    def replicas(self) -> dict[str, Any]:
        with self.store.tx(readonly=True) as tx:
            return {"replicas": [replica_json(r) for r in tx.list_replicas()]}

    def _driver(self, kind: str) -> Driver:
        return self.reconciler.driver(kind)  # the reconciler's registry: one source of drivers

    def _source(self, replica: ReplicaRecord) -> LogSource:
        return LogSource(replica.id, self._driver(replica.driver))

    def _can_follow(self, replicas: list[ReplicaRecord], what: str) -> None:
        """A follow is refused up front on a driver whose logs cannot be followed live."""
        for kind in sorted({r.driver for r in replicas}):
            found = self.reconciler.registry.entry(kind)
            if not found.can(Capability.LIVE_LOGS):
                raise ApiError(HTTPStatus.BAD_REQUEST,
                               f"logs -f {what}: the {kind} driver cannot follow logs while a "
                               "replica runs; read them without follow")

    def replica(self, ref: str) -> ReplicaRecord:
        """A replica by id or unique id prefix (ids are long; people type the start)."""
        with self.store.tx(readonly=True) as tx:
            found = tx.get_replica(ref)
            if found is not None:
                return found
            hits = [r for r in tx.list_replicas() if ref and r.id.startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"replica id {ref!r} is ambiguous "
                           f"({', '.join(r.id for r in hits)}); give more characters")
        raise NotFoundError(f"no replica {ref!r} in the control plane; see `uniframe get replicas`")

    def replica_logs(self, ref: str, lines: int | None = None,
                     follow: bool = False) -> Iterator[bytes]:
        found = self.replica(ref)
        if follow:
            self._can_follow([found], ref)
        return replica_log(self._source(found), lines, follow)

    def object_logs(self, kind: str, name: str, lines: int | None = None,
                    follow: bool = False) -> Iterator[bytes]:
        with self.store.tx(readonly=True) as tx:
            self._get(tx, kind, name)
            if follow:
                self._can_follow(tx.list_replicas(kind, name), f"{kind}/{name}")

        def sources() -> list[LogSource]:
            with self.store.tx(readonly=True) as tx:
                return [self._source(r) for r in tx.list_replicas(kind, name)]

        def exists() -> bool:
            with self.store.tx(readonly=True) as tx:
                return tx.get_object(kind, name) is not None

        return object_log(sources, lines, follow, exists)

    # -- events ----------------------------------------------------------------------------

    def events(self, after: int = 0, limit: int | None = None, *, kind: str | None = None,
               name: str | None = None, tail: int | None = None) -> dict[str, Any]:
        """Events oldest first; ``tail`` keeps only the newest ones (after the other filters)."""
        with self.store.tx(readonly=True) as tx:
            events = tx.events(kind, name, after_id=after, limit=None if tail else limit)
        if tail is not None:
            events = events[-tail:] if tail else []
            events = events[:limit] if limit is not None else events
        return {"events": [asdict(e) for e in events]}

    # -- models ------------------------------------------------------------------------------

    def models(self, name: str | None = None) -> dict[str, Any]:
        return {"models": [m.to_json() for m in self.registry.list(name)]}

    def model(self, name: str, version: str) -> dict[str, Any]:
        model = self.registry.inspect(name, version)
        return {**model.to_json(), "path": str(self.registry.resolve(model.ref)),
                "used_by": self.registry.users(name, version)}

    def push_model(self, file: Path, name: str, version: str | None,
                   metadata: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Store an uploaded ONNX file (already on disk, named ``*.onnx``) as a version."""
        pushed = self.registry.push(file, name, version=version, metadata=metadata)
        return {"model": pushed.model.to_json(), "created": pushed.created}, pushed.created

    def remove_model(self, name: str, version: str) -> dict[str, Any]:
        return {"removed": self.registry.remove(name, version).to_json()}

    # -- uploads -----------------------------------------------------------------------------

    def upload(self, sha256: str, name: str) -> dict[str, Any]:
        found = self.uploads.find(sha256, name)
        if found is None:
            raise NotFoundError(f"no upload {sha256}/{name}; send it with POST /v1/uploads")
        return {"path": str(found), "sha256": sha256, "size": found.stat().st_size}

    def add_upload(self, file: Path, name: str, sha256: str | None) -> tuple[dict[str, Any], bool]:
        path, created = self.uploads.add(file, name, sha256)
        return {"path": str(path), "sha256": path.parent.name,
                "size": path.stat().st_size}, created

    # -- metrics ---------------------------------------------------------------------------

    def metrics(self) -> str:
        with self.store.tx(readonly=True) as tx:
            objects = tx.list_objects()
            replicas = tx.list_replicas()
            latest = [tx.get_rollout(o.kind, o.name) for o in objects]
        rollout_states = Counter(r.state for r in latest if r is not None)
        states: dict[str, int] = {}
        for r in replicas:
            states[r.state] = states.get(r.state, 0) + 1
        rec = self.reconciler
        lines = [
            "# HELP uniframe_objects Live applied objects.",
            "# TYPE uniframe_objects gauge",
            f"uniframe_objects {len(objects)}",
            "# HELP uniframe_replicas Replicas recorded in the store, by state.",
            "# TYPE uniframe_replicas gauge",
            *(f'uniframe_replicas{{state="{s}"}} {n}' for s, n in sorted(states.items())),
            "# HELP uniframe_replica_restarts Restarts of the replicas that exist now.",
            "# TYPE uniframe_replica_restarts gauge",
            f"uniframe_replica_restarts {sum(r.restarts for r in replicas)}",
            "# HELP uniframe_reconcile_passes_total Reconcile passes since the daemon started.",
            "# TYPE uniframe_reconcile_passes_total counter",
            f"uniframe_reconcile_passes_total {rec.passes}",
            "# HELP uniframe_reconcile_errors_total Objects whose reconcile failed.",
            "# TYPE uniframe_reconcile_errors_total counter",
            f"uniframe_reconcile_errors_total {rec.errors}",
            "# HELP uniframe_reconcile_last_pass_seconds Duration of the last pass.",
            "# TYPE uniframe_reconcile_last_pass_seconds gauge",
            f"uniframe_reconcile_last_pass_seconds {rec.last_pass_seconds:.6f}",
            "# HELP uniframe_rollouts Objects by the state of their latest rollout.",
            "# TYPE uniframe_rollouts gauge",
            *(f'uniframe_rollouts{{state="{s}"}} {n}' for s, n in sorted(rollout_states.items())),
            *_endpoint_metrics(rec.endpoints.statuses()),
            *_autoscaler_metrics(rec.autoscalers.status()),
        ]
        return "\n".join(lines) + "\n"


def _autoscaler_metrics(scales: dict[str, ScaleStatus]) -> list[str]:
    """Each autoscaled service's decider: desired vs ready, what it observed, panic mode."""
    series: list[tuple[str, str, Callable[[ScaleStatus], float]]] = [
        ("uniframe_autoscaler_desired_replicas", "Replicas the autoscaler wants.",
         lambda sc: sc.desired),
        ("uniframe_autoscaler_ready_replicas", "Ready replicas the autoscaler scales from.",
         lambda sc: sc.ready),
        ("uniframe_autoscaler_observed", "The metric the last decision followed (the panic "
         "window's while panicking), for the whole service.", lambda sc: sc.observed),
        ("uniframe_autoscaler_target", "The metric's target per replica.", lambda sc: sc.target),
        ("uniframe_autoscaler_panic_mode", "1 while the autoscaler panics.",
         lambda sc: int(sc.panicking)),
        ("uniframe_autoscaler_min_replicas", "spec.autoscaling.min.", lambda sc: sc.min),
        ("uniframe_autoscaler_max_replicas", "spec.autoscaling.max.", lambda sc: sc.max),
    ]
    lines: list[str] = []
    for name, text, value in series:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
        lines += [f'{name}{{service="{svc}",metric="{sc.metric}"}} {value(sc):g}'
                  for svc, sc in scales.items()]
    return lines


def _endpoint_metrics(statuses: dict[str, EndpointStatus]) -> list[str]:
    """Each service endpoint's own counters, labelled by service (the data path's view)."""
    series: list[tuple[str, str, str, Callable[[EndpointStatus], int]]] = [
        ("uniframe_endpoint_requests_total", "counter", "Requests the endpoint answered.",
         lambda st: st.requests),
        ("uniframe_endpoint_retries_total", "counter",
         "Requests retried on another replica after theirs failed.", lambda st: st.retries),
        ("uniframe_endpoint_upstream_errors_total", "counter",
         "Replica connections that failed.", lambda st: st.upstream_errors),
        ("uniframe_endpoint_backends_eligible", "gauge",
         "Replicas the endpoint sends traffic to now.",
         lambda st: sum(b.eligible for b in st.backends)),
    ]
    lines: list[str] = []
    for name, kind, text, value in series:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{service="{svc}"}} {value(st)}' for svc, st in statuses.items()]
    return lines
