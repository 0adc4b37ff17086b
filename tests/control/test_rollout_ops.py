"""The user's rollout operations on the store alone: what changes a revision, and clear refusals."""

from __future__ import annotations

import pytest

from uniframe.control import rollouts
from uniframe.control.states import PAUSED, PROGRESSING, PROMOTED
from uniframe.control.store import Store
from uniframe.errors import ConflictError, NotFoundError

SVC = "InferenceService"


def doc(version: int, **extra: object) -> dict[str, object]:
    return {"apiVersion": "uniframe.dev/v1alpha1", "kind": SVC, "metadata": {"name": "iris"},
            "spec": {"model": {"name": "iris", "version": version}, "runtime": "process",
                     "replicas": 2, **extra}}


def test_only_what_replicas_are_made_of_changes_the_revision() -> None:
    base = rollouts.revision_digest(doc(1))
    assert rollouts.revision_digest(doc(1, replicas=5)) == base
    assert rollouts.revision_digest(doc(1, servicePort=9000, healthCheck={"periodSeconds": 1},
                                        rollout={"strategy": "canary"})) == base
    assert rollouts.revision_digest(doc(2)) != base
    assert rollouts.revision_digest(doc(1, runtime="unikernel")) != base
    assert rollouts.revision_digest(doc(1, env={"A": "1"})) != base
    # the image bakes the name in (the server's --name): another name is another revision
    assert rollouts.revision_digest({**doc(1), "metadata": {"name": "beta"}}) != base
    assert rollouts.revision_digest({**doc(1), "metadata": {"name": "iris",
                                                            "labels": {"a": "b"}}}) == base


def test_with_revision_keeps_the_current_scaling_and_rollout_settings() -> None:
    current = doc(2, replicas=7, rollout={"strategy": "canary"}, env={"X": "1"})
    merged = rollouts.with_revision(current, doc(1))
    assert merged["spec"]["model"] == {"name": "iris", "version": 1}
    assert merged["spec"]["replicas"] == 7
    assert merged["spec"]["rollout"] == {"strategy": "canary"}
    assert "env" not in merged["spec"]


def test_wanted_replicas() -> None:
    assert rollouts.wanted_replicas(doc(1)) == 2
    assert rollouts.wanted_replicas(doc(1, replicas=0)) == 0
    no_count = {"spec": {"autoscaling": {"min": 0, "max": 3}}}
    assert rollouts.wanted_replicas(no_count) == 1
    assert rollouts.wanted_replicas({"spec": {"autoscaling": {"min": 2, "max": 3}}}) == 2


def test_refusals_say_why(store: Store) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        rollouts.status(store, SVC, "iris")
    with store.tx() as tx:
        tx.apply_object(SVC, "iris", doc(1))
        tx.record_revision(SVC, "iris", rollouts.revision_digest(doc(1)), doc(1))
    with pytest.raises(ConflictError, match="no earlier revision"):
        rollouts.undo(store, SVC, "iris")
    with pytest.raises(ConflictError, match=r"no canary to promote.*its rollout is none"):
        rollouts.promote(store, SVC, "iris")
    with store.tx() as tx:
        tx.start_rollout(SVC, "iris", strategy="rolling", from_digest="", to_digest="x",
                         state=PROGRESSING, traffic_percent=None)
    with pytest.raises(ConflictError, match="a rolling rollout, progressing"):
        rollouts.promote(store, SVC, "iris")
    with pytest.raises(NotFoundError, match=r"no revision 7 \(its revisions: 1\)"):
        rollouts.undo(store, SVC, "iris", to_revision=7)
    with pytest.raises(ConflictError, match="already runs revision 1"):
        rollouts.undo(store, SVC, "iris", to_revision=1)


def test_promote_and_undo_write_the_store(store: Store) -> None:
    with store.tx() as tx:
        for version in (1, 2):
            tx.apply_object(SVC, "iris", doc(version))
            tx.record_revision(SVC, "iris", rollouts.revision_digest(doc(version)), doc(version))
        tx.start_rollout(SVC, "iris", strategy="canary", from_digest="a",
                         to_digest=rollouts.revision_digest(doc(2)), state=PAUSED,
                         traffic_percent=10)
    status = rollouts.promote(store, SVC, "iris")
    assert (status.state, status.revision, status.desired) == (PROMOTED, 2, 2)
    undone = rollouts.undo(store, SVC, "iris")
    assert undone.spec["spec"]["model"] == {"name": "iris", "version": 1}
    assert [r.number for r in rollouts.revisions(store, SVC, "iris")] == [1, 2]
    with store.tx(readonly=True) as tx:
        reasons = [e.reason for e in tx.events(SVC, "iris")]
    assert reasons[-2:] == ["Updated", "RollbackRequested"]
    assert "Promoted" in reasons
