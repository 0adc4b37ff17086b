"""What a rollout step should do, as pure arithmetic over replica counts.

Kept apart from the reconciler so the rules (Kubernetes' maxSurge and
maxUnavailable, a canary's share) can be tested exhaustively without
starting anything. The reconciler observes, asks the planner, and acts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from uniframe.control.states import CRASH_LOOP, CRASHED, READY
from uniframe.control.store import ReplicaRecord


def resolve(value: int | str, total: int, *, round_up: bool) -> int:
    """A count or ``"25%"`` of ``total``; surge rounds up and unavailability down, as Kubernetes does."""
    if isinstance(value, int):
        return value
    share = total * int(value.rstrip("%")) / 100
    return math.ceil(share) if round_up else math.floor(share)


def canary_count(want: int, percent: int) -> int:
    """Replicas for a canary taking ``percent`` of the traffic: at least one, at most all."""
    return max(1, min(want, math.ceil(want * percent / 100))) if want else 0


@dataclass
class Step:
    """Replicas to create (of the new revision) and to retire, in that order of preference."""

    create: int = 0
    remove: list[ReplicaRecord] = field(default_factory=list)


def _worst_first(replicas: Sequence[ReplicaRecord]) -> list[ReplicaRecord]:
    """Replicas to give up first: crashed, then not ready, then the newest ready ones."""
    rank = {CRASH_LOOP: 0, CRASHED: 1}
    return sorted(replicas, key=lambda r: (rank.get(r.state, 3 if r.state == READY else 2),
                                           -r.created_at))


def scale(want: int, current: Sequence[ReplicaRecord]) -> Step:
    """Steady state: as many replicas of one revision as wanted."""
    if len(current) > want:
        return Step(remove=_worst_first(current)[: len(current) - want])
    return Step(create=want - len(current))


def rolling(want: int, surge: int, unavailable: int, new: Sequence[ReplicaRecord],
            old: Sequence[ReplicaRecord]) -> Step:
    """One step of a rolling update from ``old`` replicas to ``new`` ones.

    Never more than ``want + surge`` replicas, never fewer than
    ``want - unavailable`` ready ones: old replicas that are not ready go
    first (they serve nothing), ready ones only as new ones become ready.
    """
    step = Step()
    extra_new = len(new) - want
    if extra_new > 0:
        step.remove += _worst_first(new)[:extra_new]
        new = [r for r in new if r not in step.remove]
    ready_new = sum(r.state == READY for r in new)
    ready_old = [r for r in old if r.state == READY]
    step.remove += [r for r in old if r.state != READY]
    floor = max(0, want - unavailable)
    retire = min(len(ready_old), max(0, ready_new + len(ready_old) - floor))
    step.remove += _worst_first(ready_old)[:retire]
    left_old = len(old) - sum(r in step.remove for r in old)
    room = want + surge - (len(new) + left_old)
    step.create = max(0, min(room, want - len(new)))
    return step


def canary(want: int, percent: int, new: Sequence[ReplicaRecord],
           old: Sequence[ReplicaRecord]) -> Step:
    """Hold a canary: ``canary_count`` new replicas beside the full old set."""
    target = canary_count(want, percent)
    step = scale(target, new)
    if len(old) > want:
        step.remove += _worst_first(old)[: len(old) - want]
    return step


def weights(percent: int, new_group: str, old_groups: Sequence[str]) -> dict[str, int]:
    """The endpoint's traffic split for a canary: ``percent`` to the new revision, the rest shared."""
    split = {g: 0 for g in old_groups}
    if old_groups:
        share, rest = divmod(100 - percent, len(old_groups))
        for i, g in enumerate(old_groups):
            split[g] = share + (1 if i < rest else 0)
    split[new_group] = percent
    return split
