"""Snapshot templates in the reconciler (control/templates.py) over the in-memory fake driver:
one template per revision after a warm-up, clones restored on every cold start (scale-up and
from zero), a failed restore booting with a Warning event, templates of a retired revision
removed, none at all without autoscaling.

The fake carries its served-request counter into a restore, so a clone restored from a
template that answered the warm-up has answered once before its first request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_runtime import fake_driver
from test_autoscaling_reconciler import FAST, World

from uniframe.control.reconciler import READY
from uniframe.control.store import ReplicaRecord
from uniframe.runtime.fake import FakeDriver
from uniframe.runtime.replica import Replica, ReplicaConfig
from uniframe.runtime.snapshot import Snapshot, SnapshotMismatchError

SVC = "InferenceService"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()


def _fake(tmp_path: Path) -> FakeDriver:
    return fake_driver(tmp_path / "st")


def _restored_from(fake: FakeDriver, rec: ReplicaRecord) -> str | None:
    value = fake.get(rec.id).extra.get("restored_from")
    return str(value) if value is not None else None


def _events(world: World, reason: str) -> list[tuple[str, str]]:
    with world.store.tx(readonly=True) as tx:
        return [(e.type, e.message) for e in tx.events(SVC, "svc") if e.reason == reason]


def _scale_to(world: World, count: int) -> list[ReplicaRecord]:
    world.tick(in_flight=count)
    world.tick(in_flight=count)
    return world.settle("svc", count)


def test_one_template_per_revision_and_scale_up_restores_clones(world: World,
                                                                tmp_path: Path) -> None:
    fake = _fake(tmp_path)
    world.apply("svc", autoscaling={"min": 1, "max": 4, **FAST})
    [first] = world.settle("svc", 1)
    world.rec.reconcile_once()
    assert fake.get(first.id).config.snapshottable
    [snap] = fake.snapshots()
    assert snap.source_replica == first.id
    assert len(_events(world, "TemplateTaken")) == 1
    assert fake.served(first.id) >= 1  # the warm-up inference was answered before the snapshot
    recorded = json.loads((tmp_path / "st" / "templates" / "svc.json").read_text())
    assert [t["snapshot"]["id"] for t in recorded["templates"]] == [snap.id]

    replicas = _scale_to(world, 3)
    clones = [r for r in replicas if r.id != first.id]
    assert len(clones) == 2
    assert all(_restored_from(fake, r) == snap.id for r in clones)
    assert all(fake.served(r.id) >= 1 for r in clones)  # the template's state came along
    assert len(_events(world, "Restored")) == 2
    world.rec.reconcile_once()
    assert [s.id for s in fake.snapshots()] == [snap.id]  # taken once, not per replica or pass
    assert len(_events(world, "TemplateTaken")) == 1


def test_a_service_at_zero_wakes_through_a_restored_clone(world: World, tmp_path: Path) -> None:
    fake = _fake(tmp_path)
    world.apply("svc", autoscaling={"min": 0, "max": 2, **FAST})
    world.settle("svc", 0)
    _scale_to(world, 1)
    world.rec.reconcile_once()
    [snap] = fake.snapshots()
    for _ in range(40):
        world.tick(in_flight=0)
        world.rec.reconcile_once()
        if not world.replicas("svc"):
            break
    assert world.replicas("svc") == []
    [clone] = _scale_to(world, 1)
    assert _restored_from(fake, clone) == snap.id


def test_a_failed_restore_boots_with_a_warning_and_a_new_template_is_taken(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake(tmp_path)
    world.apply("svc", autoscaling={"min": 1, "max": 3, **FAST})
    [first] = world.settle("svc", 1)
    world.rec.reconcile_once()
    [snap] = fake.snapshots()

    def refuse(self: FakeDriver, snapshot: Snapshot, config: ReplicaConfig) -> Replica:
        raise SnapshotMismatchError(f"snapshot {snapshot.id} is stale (injected)")

    monkeypatch.setattr(FakeDriver, "restore", refuse)
    replicas = _scale_to(world, 2)
    [booted] = [r for r in replicas if r.id != first.id]
    assert _restored_from(fake, booted) is None
    [(kind, message)] = _events(world, "RestoreFailed")
    assert kind == "Warning"
    assert snap.id in message and "injected" in message and "booting" in message
    world.rec.reconcile_once()
    # the stale template is not used again: a booted replica became a new one
    assert len(_events(world, "TemplateTaken")) == 2
    assert world.rec.templates.template("svc", first.revision) not in (None, snap)


def test_a_rollout_removes_the_old_revisions_template(world: World, tmp_path: Path) -> None:
    fake = _fake(tmp_path)
    scaling = {"min": 1, "max": 2, **FAST}
    world.apply("svc", autoscaling=scaling)
    [first] = world.settle("svc", 1)
    world.rec.reconcile_once()
    [old] = fake.snapshots()
    world.apply("svc", autoscaling=scaling, env={"REVISION": "2"})
    for _ in range(600):  # the new revision's image is built, then it replaces the old one
        [second] = world.settle("svc", 1)
        if second.revision != first.revision:
            break
        time.sleep(0.1)
    assert second.revision != first.revision
    world.rec.reconcile_once()
    snaps = fake.snapshots()
    assert old.id not in {s.id for s in snaps}
    assert [s.source_replica for s in snaps] == [second.id]
    assert [s.id for s in world.rec.templates.all("svc")] == [s.id for s in snaps]


def test_deleting_the_service_removes_its_templates(tmp_path: Path) -> None:
    world = World(tmp_path)
    fake = _fake(tmp_path)
    world.apply("svc", autoscaling={"min": 1, "max": 2, **FAST})
    world.settle("svc", 1)
    world.rec.reconcile_once()
    assert len(fake.snapshots()) == 1
    world.close()  # deletes every object and passes once
    assert fake.snapshots() == []
    assert not (tmp_path / "st" / "templates" / "svc.json").exists()


def test_without_autoscaling_no_template_is_taken(world: World, tmp_path: Path) -> None:
    fake = _fake(tmp_path)
    world.apply("svc", replicas=1)
    for _ in range(600):  # World.settle waits for a decider; a fixed count has none
        world.rec.reconcile_once()
        replicas = world.replicas("svc")
        if replicas and replicas[0].state == READY:
            break
        time.sleep(0.1)
    [rec] = world.replicas("svc")
    world.rec.reconcile_once()
    assert not fake.get(rec.id).config.snapshottable
    assert fake.snapshots() == []
