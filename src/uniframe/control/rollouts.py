"""Revisions and rollouts as users see them: status, promote, undo, history.

A *revision* is what replicas are made of: the spec without the fields that
do not change a replica (count, autoscaling, the rollout and health-check
settings, the endpoint's port), plus the object's name, which the image bakes
in (the model server announces its model under it). Applying a spec with a new revision digest
starts a rollout, which the reconciler carries out; these functions only read
and write the store, so the API and the reconciler share one meaning of each
operation. An undo re-applies an earlier revision's spec (a new generation),
exactly as if the user had applied it, and the reconciler rolls to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from uniframe.control.states import PAUSED, PROGRESSING, PROMOTED, READY
from uniframe.control.store import ObjectRecord, Revision, Store, Tx, spec_digest
from uniframe.errors import ConflictError, NotFoundError

# Spec fields that do not change what a replica is made of.
NOT_IN_REVISION = frozenset({"replicas", "autoscaling", "rollout", "healthCheck", "servicePort"})


def revision_digest(spec: dict[str, Any]) -> str:
    """The digest of what replicas are made from; equal digests mean nothing to roll.

    It is also the key of the revision's image (its ``source_spec_digest``), so
    it covers everything an image bakes in, the name included: two services
    that differ only in name must not share an image that serves one name.
    """
    body = {k: v for k, v in spec.get("spec", {}).items() if k not in NOT_IN_REVISION}
    name = (spec.get("metadata") or {}).get("name")
    return spec_digest({"apiVersion": spec.get("apiVersion"), "kind": spec.get("kind"),
                        "name": name, "spec": body})


def wanted_replicas(spec: dict[str, Any]) -> int:
    """Replicas to run: the fixed count, or autoscaling's floor (at least one) where no decider
    has spoken; the reconciler asks the daemon's autoscaler for an autoscaled service instead."""
    body = spec.get("spec", {})
    if body.get("replicas") is not None:
        return int(body["replicas"])
    autoscaling = body.get("autoscaling")
    return max(1, int(autoscaling.get("min", 0))) if isinstance(autoscaling, dict) else 1


def with_revision(current: dict[str, Any], revision: dict[str, Any]) -> dict[str, Any]:
    """``revision``'s replica-making fields under ``current``'s scaling, rollout and health settings."""
    body = {k: v for k, v in revision.get("spec", {}).items() if k not in NOT_IN_REVISION}
    body.update({k: v for k, v in current.get("spec", {}).items() if k in NOT_IN_REVISION})
    return {**revision, "metadata": current.get("metadata", revision.get("metadata")),
            "spec": body}


@dataclass(frozen=True)
class RolloutStatus:
    """Where an object's latest rollout stands, with the replica counts that explain it."""

    kind: str
    name: str
    strategy: str
    state: str
    revision: int | None
    from_revision: int | None
    traffic_percent: int | None
    desired: int
    updated: int
    updated_ready: int
    ready: int
    old: int
    message: str
    started_at: float | None
    updated_at: float | None

    @property
    def done(self) -> bool:
        """True when nothing more will happen without the user (complete, rolled back, failed)."""
        return self.state not in (PROGRESSING, PROMOTED)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _numbers(revs: list[Revision]) -> dict[str, int]:
    return {r.digest: r.number for r in revs}


def _object(tx: Tx, kind: str, name: str) -> ObjectRecord:
    obj = tx.get_object(kind, name)
    if obj is None:
        raise NotFoundError(f"{kind}/{name} does not exist; see `uniframe get`")
    return obj


def read_status(tx: Tx, obj: ObjectRecord) -> RolloutStatus:
    """The status of ``obj``'s rollout, inside an open transaction."""
    numbers = _numbers(tx.list_revisions(obj.kind, obj.name))
    replicas = tx.list_replicas(obj.kind, obj.name)
    rollout = tx.get_rollout(obj.kind, obj.name)
    desired = wanted_replicas(obj.spec)
    target = rollout.to_digest if rollout is not None else revision_digest(obj.spec)
    updated = [r for r in replicas if r.revision == target]
    return RolloutStatus(
        kind=obj.kind, name=obj.name,
        strategy=rollout.strategy if rollout is not None else "rolling",
        state=rollout.state if rollout is not None else PROGRESSING,
        revision=numbers.get(target),
        from_revision=numbers.get(rollout.from_digest) if rollout is not None else None,
        traffic_percent=rollout.traffic_percent if rollout is not None else None,
        desired=desired, updated=len(updated),
        updated_ready=sum(r.state == READY for r in updated),
        ready=sum(r.state == READY for r in replicas),
        old=len(replicas) - len(updated),
        message=rollout.message if rollout is not None else "not reconciled yet",
        started_at=rollout.started_at if rollout is not None else None,
        updated_at=rollout.updated_at if rollout is not None else None,
    )


def status(store: Store, kind: str, name: str) -> RolloutStatus:
    with store.tx(readonly=True) as tx:
        return read_status(tx, _object(tx, kind, name))


def revisions(store: Store, kind: str, name: str) -> list[Revision]:
    """The object's revisions, oldest first (the last is the one it runs or rolls to)."""
    with store.tx(readonly=True) as tx:
        _object(tx, kind, name)
        return tx.list_revisions(kind, name)


def promote(store: Store, kind: str, name: str) -> RolloutStatus:
    """Give a canary the whole service: the rollout finishes like a rolling update."""
    with store.tx() as tx:
        obj = _object(tx, kind, name)
        rollout = tx.get_rollout(kind, name)
        if rollout is None or rollout.strategy != "canary" or rollout.state not in (PROGRESSING,
                                                                                  PAUSED):
            state = "none" if rollout is None else f"a {rollout.strategy} rollout, {rollout.state}"
            raise ConflictError(f"{kind}/{name} has no canary to promote (its rollout is {state}); "
                                "canaries come from spec.rollout.strategy: canary")
        tx.update_rollout(kind, name, state=PROMOTED,
                          message="canary promoted; replacing the remaining replicas")
        tx.add_event(kind, name, "Promoted", "canary promoted by the user")
        return read_status(tx, obj)


def undo(store: Store, kind: str, name: str, to_revision: int | None = None) -> ObjectRecord:
    """Apply an earlier revision again (the previous one by default); the reconciler rolls to it."""
    with store.tx() as tx:
        obj = _object(tx, kind, name)
        revs = tx.list_revisions(kind, name)
        current = revision_digest(obj.spec)
        if to_revision is None:
            earlier = [r for r in revs if r.digest != current]
            if not earlier:
                raise ConflictError(f"{kind}/{name} has no earlier revision to go back to")
            target = earlier[-1]
        else:
            found = [r for r in revs if r.number == to_revision]
            if not found:
                have = ", ".join(str(r.number) for r in revs) or "none yet"
                raise NotFoundError(f"{kind}/{name} has no revision {to_revision} "
                                    f"(its revisions: {have})")
            target = found[0]
            if target.digest == current:
                raise ConflictError(f"{kind}/{name} already runs revision {to_revision}")
        updated, _ = tx.apply_object(kind, name, with_revision(obj.spec, target.spec))
        tx.add_event(kind, name, "RollbackRequested", f"back to revision {target.number}")
        return updated

