"""The rollout arithmetic, simulated to the end for many shapes of rollout."""

from __future__ import annotations

import itertools

import pytest

from uniframe.control import planner
from uniframe.control.states import CRASHED, READY, STARTING
from uniframe.control.store import ReplicaRecord


def replica(n: int, revision: str, state: str = READY) -> ReplicaRecord:
    return ReplicaRecord(id=f"{revision}-{n}", kind="InferenceService", name="s", driver="process",
                         image_digest="d", state=state, desired="running", host_port=None,
                         created_at=float(n), updated_at=0.0, revision=revision)


def test_resolve_counts_and_percentages_like_kubernetes() -> None:
    assert planner.resolve(2, 10, round_up=True) == 2
    assert planner.resolve("25%", 10, round_up=True) == 3
    assert planner.resolve("25%", 10, round_up=False) == 2
    assert planner.resolve("100%", 3, round_up=False) == 3


def test_scale_removes_the_worst_first() -> None:
    current = [replica(1, "a"), replica(2, "a", CRASHED), replica(3, "a", STARTING)]
    step = planner.scale(1, current)
    assert step.create == 0
    assert [r.id for r in step.remove] == ["a-2", "a-3"]
    assert planner.scale(5, current).create == 2


@pytest.mark.parametrize(("want", "surge", "unavailable"), [
    (w, s, u) for w, s, u in itertools.product(range(0, 5), range(0, 3), range(0, 3))
    if s or u])
def test_a_rolling_update_keeps_its_bounds_and_finishes(want: int, surge: int,
                                                        unavailable: int) -> None:
    """Every step: total <= want + surge, ready >= want - unavailable; new replicas get ready one step later."""
    old = [replica(i, "old") for i in range(want)]
    new: list[ReplicaRecord] = []
    made = 0
    for _ in range(4 * want + 4):
        step = planner.rolling(want, surge, unavailable, new, old)
        gone = {r.id for r in step.remove}
        new = [replica(int(r.id.split("-")[1]), "new", READY) for r in new if r.id not in gone]
        old = [r for r in old if r.id not in gone]
        ready = len(new) + sum(r.state == READY for r in old)
        assert ready >= min(want, want - unavailable), (new, old)
        for _ in range(step.create):
            made += 1
            new.append(replica(made, "new", STARTING))
        assert len(new) + len(old) <= want + surge
        if not old and len(new) == want and all(r.state == READY for r in new):
            break
    else:
        pytest.fail(f"rolling update {want=} {surge=} {unavailable=} did not finish")
    assert made == want  # no replica started twice


def test_rolling_retires_broken_old_replicas_at_once() -> None:
    old = [replica(1, "old"), replica(2, "old", CRASHED)]
    step = planner.rolling(2, 1, 0, [], old)
    assert [r.id for r in step.remove] == ["old-2"]
    assert step.create == 2  # the crashed one frees its slot: 1 old + 2 new = want + surge


def test_a_canary_runs_its_share_beside_the_full_old_set() -> None:
    old = [replica(i, "old") for i in range(4)]
    assert planner.canary_count(4, 10) == 1
    assert planner.canary_count(4, 50) == 2
    assert planner.canary_count(4, 100) == 4
    assert planner.canary_count(0, 50) == 0
    step = planner.canary(4, 50, [], old)
    assert (step.create, step.remove) == (2, [])
    step = planner.canary(4, 50, [replica(1, "new"), replica(2, "new"), replica(3, "new")], old)
    assert (step.create, [r.id for r in step.remove]) == (0, ["new-3"])


def test_canary_weights_split_the_rest_between_old_groups() -> None:
    assert planner.weights(10, "new", ["a"]) == {"a": 90, "new": 10}
    assert planner.weights(25, "new", ["a", "b"]) == {"a": 38, "b": 37, "new": 25}
    assert planner.weights(30, "new", []) == {"new": 30}
