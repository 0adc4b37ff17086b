"""The reconciler acting on the autoscaler: scale up, down to min, to zero, from zero on demand,
and scaling in the middle of a rolling update.

Replicas are the in-memory fake's (``fake_runtime.py``) and the load and the clock are the
test's, fed to the deciders through the same seam the daemon's sampler uses: the subject is
what the reconciler does with a decision. ``test_autoscaling_e2e.py`` runs the real thing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import fake_registry

from uniframe.build.examples import write_iris
from uniframe.build.store import ImageStore
from uniframe.cli.get import autoscaling_text, ready_text
from uniframe.control.api.methods import Api
from uniframe.control.autoscaling import Autoscalers, Load
from uniframe.control.reconciler import READY, Reconciler
from uniframe.control.states import COMPLETE
from uniframe.control.store import ReplicaRecord, Store
from uniframe.spec import load_data

SVC = "InferenceService"


class World:
    """A reconciler over the fake driver, with a load and a clock the test sets."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = Store.open(tmp_path / "state.db")
        self.rec = Reconciler(self.store, state_root=tmp_path / "st",
                              build_store=ImageStore(tmp_path / "img"), registry=fake_registry())
        self.now = 1000.0
        self.load: dict[str, Load] = {}
        self.rec.autoscalers = Autoscalers(lambda s: self.load.get(s), changed=self.rec._scaled,
                                           clock=lambda: self.now)
        self.model = write_iris(tmp_path / "model")

    def apply(self, name: str, **spec: Any) -> None:
        doc = {"apiVersion": "uniframe.dev/v1alpha1", "kind": SVC, "metadata": {"name": name},
               "spec": {"model": {"uri": str(self.model)}, "runtime": "process", **spec}}
        body = load_data(doc).spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        with self.store.tx() as tx:
            tx.apply_object(SVC, name, body)

    def replicas(self, name: str) -> list[ReplicaRecord]:
        with self.store.tx(readonly=True) as tx:
            return tx.list_replicas(SVC, name)

    def reasons(self, name: str) -> list[str]:
        with self.store.tx(readonly=True) as tx:
            return [e.reason for e in tx.events(SVC, name)]

    def tick(self, seconds: float = 1.0, in_flight: int | None = None, name: str = "svc") -> None:
        """``seconds`` pass; the endpoint shows ``in_flight`` (and answered that many)."""
        self.now += seconds
        if in_flight is not None:
            last = self.load.get(name, Load(0, 0))
            self.load[name] = Load(in_flight, last.requests + in_flight)
        self.rec.autoscalers.sample()

    def settle(self, name: str, count: int, *, timeout: float = 120.0) -> list[ReplicaRecord]:
        """Pass until ``name`` has exactly ``count`` replicas, all ready (and its image is built:
        the decider is tracked from the first pass that has one)."""
        deadline = time.monotonic() + timeout
        while True:
            self.rec.reconcile_once()
            replicas = self.replicas(name)
            if (len(replicas) == count and all(r.state == READY for r in replicas)
                    and self.rec.autoscalers.desired(name) is not None):
                return replicas
            assert time.monotonic() < deadline, (count, replicas)
            time.sleep(0.1)

    def close(self) -> None:
        with self.store.tx() as tx:
            for obj in tx.list_objects():
                tx.delete_object(obj.kind, obj.name)
        self.rec.reconcile_once()
        self.rec.close()
        self.store.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()


FAST = {"stableWindow": "6s", "scaleToZeroGracePeriod": "3s", "target": 1}


def test_load_scales_up_idle_scales_down_to_zero_and_demand_wakes_it(world: World) -> None:
    world.apply("svc", autoscaling={"min": 0, "max": 4, **FAST})
    world.settle("svc", 0)  # min 0 and no request yet: the image is built, nothing runs
    assert world.rec.autoscalers.desired("svc") == 0

    world.tick(in_flight=3)  # three requests in flight: three replicas (and a panic: 3 of 1 ready)
    assert world.rec.autoscalers.desired("svc") == 3
    first = {r.id for r in world.settle("svc", 3)}
    world.tick(in_flight=3)
    assert world.rec.autoscalers.status()["svc"].ready == 3

    world.tick(in_flight=4)  # one more: one more replica, none of the three replaced
    world.tick(in_flight=4)
    assert world.rec.autoscalers.desired("svc") == 4
    assert first < {r.id for r in world.settle("svc", 4)}

    counts = []
    for _ in range(40):  # idle: down (halving at most per decision, never during panic), then zero
        world.tick(in_flight=0)
        world.rec.reconcile_once()
        counts.append(world.rec.autoscalers.desired("svc") or 0)
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0, counts
    world.settle("svc", 0)
    # zero only after the grace period at one replica
    ones = counts.count(1)
    assert ones >= 3, counts
    reasons = world.reasons("svc")
    assert {"ScaledUp", "ScaledDown", "ScaledToZero"} <= set(reasons), reasons

    world.rec.wake_service("svc")  # the activator holds a request: one replica at once
    assert world.rec.autoscalers.desired("svc") == 1
    world.settle("svc", 1)
    with world.store.tx(readonly=True) as tx:
        scaled = [e.message for e in tx.events(SVC, "svc") if e.reason.startswith("Scaled")]
    assert "0 -> 3 replicas: 3.00 requests in flight over the panic window, target 1 per replica" in scaled[0]


def test_min_one_never_goes_to_zero(world: World) -> None:
    world.apply("svc", autoscaling={"min": 1, "max": 3, **FAST})
    world.settle("svc", 1)
    world.tick(in_flight=2)
    world.settle("svc", 2)
    world.tick(in_flight=2)

    # what get, describe and /metrics show: min/max/desired/ready, the metric, panic mode
    api = Api(world.store, world.rec)
    obj = api.object(SVC, "svc")
    scaling = obj["status"]["autoscaling"]
    assert scaling == {"min": 1, "max": 3, "metric": "concurrency", "target": 1.0, "desired": 2,
                       "ready": 2, "observed": 2.0, "panicking": True}
    assert obj["status"]["replicas"]["desired"] == 2
    assert obj["status"]["rollout"]["desired"] == 2
    assert ready_text(obj) == "2/2 (1..3)"
    assert autoscaling_text(scaling) == ("min 1, max 3, desired 2, ready 2; concurrency 2.00 in "
                                         "flight (target 1 per replica); panicking")
    metrics = api.metrics().splitlines()
    for line in ('uniframe_autoscaler_desired_replicas{service="svc",metric="concurrency"} 2',
                 'uniframe_autoscaler_ready_replicas{service="svc",metric="concurrency"} 2',
                 'uniframe_autoscaler_observed{service="svc",metric="concurrency"} 2',
                 'uniframe_autoscaler_panic_mode{service="svc",metric="concurrency"} 1'):
        assert line in metrics, line

    for _ in range(30):
        world.tick(in_flight=0)
    assert world.rec.autoscalers.desired("svc") == 1
    world.settle("svc", 1)
    assert "ScaledToZero" not in world.reasons("svc")
    assert api.object(SVC, "svc")["status"]["autoscaling"]["panicking"] is False


def test_scaling_during_a_rolling_update_keeps_its_limits(world: World) -> None:
    """Up from 2 to 4 while revision 2 rolls in (maxSurge 1, maxUnavailable 0): never more than
    desired + 1 replicas, never fewer ready than the old count, nothing scaled down, and the
    rollout completes at the new count with only new replicas."""
    scaling = {"min": 1, "max": 6, **FAST}
    world.apply("svc", autoscaling=scaling)
    world.settle("svc", 1)
    world.tick(in_flight=2)
    world.tick(in_flight=2)
    world.settle("svc", 2)

    world.apply("svc", autoscaling=scaling, env={"REVISION": "2"})
    with world.store.tx(readonly=True) as tx:
        rollout = tx.get_rollout(SVC, "svc")
        assert rollout is not None
        first = rollout.to_digest
    deadline = time.monotonic() + 120
    while rollout.to_digest == first or not any(r.revision == rollout.to_digest
                                                for r in world.replicas("svc")):
        world.tick(in_flight=2)  # its image is built, then one surge replica of revision 2
        world.rec.reconcile_once()
        with world.store.tx(readonly=True) as tx:
            rollout = tx.get_rollout(SVC, "svc")
            assert rollout is not None
        assert time.monotonic() < deadline
        time.sleep(0.1)
    digest = rollout.to_digest
    assert len(world.replicas("svc")) == 3

    world.tick(in_flight=4)  # load doubles mid-rollout
    world.tick(in_flight=4)
    assert world.rec.autoscalers.desired("svc") == 4
    deadline = time.monotonic() + 120
    while True:
        world.tick(in_flight=4)
        world.rec.reconcile_once()
        replicas = world.replicas("svc")
        desired = world.rec.autoscalers.desired("svc")
        assert desired == 4
        assert len(replicas) <= desired + 1, replicas
        assert sum(r.state == READY for r in replicas) >= 2, replicas
        with world.store.tx(readonly=True) as tx:
            rollout = tx.get_rollout(SVC, "svc")
        assert rollout is not None
        if rollout.state == COMPLETE:
            break
        assert time.monotonic() < deadline, (rollout, replicas)
        time.sleep(0.05)
    assert len(replicas) == 4 and all(r.revision == digest and r.state == READY for r in replicas)
    with world.store.tx(readonly=True) as tx:
        removed = [e.message for e in tx.events(SVC, "svc") if e.reason == "ReplicaRemoved"]
    assert len(removed) == 2 and not any("scaled down" in m for m in removed), removed
