"""Temporary vs permanent failures of a reconcile pass (issue 10, part 5), with injected failures.

A pass is made to raise on purpose (the object's pass, or its image build), so
what is checked is only what the reconciler does with the error: a permanent
one fails the object once, visibly, and is not tried again until the spec
changes; a temporary one, or any exception from outside the tree, is tried
again after a back-off that doubles. No replica runs here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from control_helpers import kill_strays

from uniframe.build.store import ImageStore
from uniframe.control import reconciler as reconciler_module
from uniframe.control import rollouts
from uniframe.control.reconciler import Reconciler
from uniframe.control.states import FAILED, PROGRESSING
from uniframe.control.store import ObjectRecord, Store
from uniframe.errors import BuildError, RuntimeDriverError, SpecError
from uniframe.spec import InferenceService

SVC = "InferenceService"
REFUSED = "spec.model.uri: /etc/shadow is outside the paths this daemon may read"


def doc(name: str = "iris", replicas: int = 1, model: str = "/srv/iris.onnx") -> dict[str, Any]:
    return {"apiVersion": "uniframe.dev/v1alpha1", "kind": SVC, "metadata": {"name": name},
            "spec": {"model": {"uri": model}, "runtime": "process", "replicas": replicas}}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(tmp_path / "state.db")
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def rec(store: Store, tmp_path: Path) -> Iterator[Reconciler]:
    reconciler = Reconciler(store, state_root=tmp_path / "st", workers=1,
                            build_store=ImageStore(tmp_path / "img"))
    try:
        yield reconciler
    finally:
        reconciler.close()
        kill_strays(tmp_path)  # the service's endpoint, which outlives a reconciler by design


def apply(store: Store, spec: dict[str, Any]) -> ObjectRecord:
    with store.tx() as tx:
        obj, _ = tx.apply_object(SVC, spec["metadata"]["name"], spec)
    return obj


def events(store: Store, reason: str) -> list[str]:
    with store.tx(readonly=True) as tx:
        return [e.message for e in tx.events(SVC, "iris") if e.reason == reason]


class Injected:
    """Stands in for one object's pass: raises what it is given, counting the attempts."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.calls = 0

    def __call__(self, obj: ObjectRecord) -> None:
        self.calls += 1
        if self.error is not None:
            raise self.error


def test_a_permanent_failure_fails_the_object_once_until_the_spec_changes(
        store: Store, rec: Reconciler, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconciler_module, "build_backoff", lambda _failures: 0.05)
    failing = Injected(SpecError(REFUSED))
    monkeypatch.setattr(rec, "reconcile_object", failing)
    apply(store, doc())

    assert rec.reconcile_once().errors == 1
    time.sleep(0.2)  # well past any back-off: only the spec may bring it back
    for _ in range(5):
        rec.reconcile_once()
    assert failing.calls == 1, "a permanent failure was retried"
    assert rec.errors == 1
    status = rollouts.status(store, SVC, "iris")
    assert status.state == FAILED
    assert REFUSED in status.message and "not retried until the spec changes" in status.message
    [event] = events(store, "ReconcileFailed")
    assert REFUSED in event

    apply(store, doc(replicas=2))  # a changed spec: a new generation runs at once
    failing.error = None
    assert rec.reconcile_once().errors == 0
    assert failing.calls == 2
    rec.reconcile_once()
    assert failing.calls == 3, "a pass that succeeded left the object held"


@pytest.mark.parametrize("error", [RuntimeDriverError("host port 18080 is taken by another "
                                                      "process; free it or pick another"),
                                   KeyError("a bug")],
                         ids=["temporary", "unknown"])
def test_a_temporary_failure_is_retried_after_a_doubling_back_off(
        store: Store, rec: Reconciler, monkeypatch: pytest.MonkeyPatch,
        error: BaseException) -> None:
    """An exception from outside the tree (here a bug's ``KeyError``) is retried like a
    temporary error: nothing says the spec is at fault, so holding the object until
    someone edits a spec that may be right would strand it."""
    delays: list[int] = []

    def backoff(failures: int) -> float:
        delays.append(failures)
        return 0.6 * float(2 ** failures)

    monkeypatch.setattr(reconciler_module, "build_backoff", backoff)
    failing = Injected(error)
    monkeypatch.setattr(rec, "reconcile_object", failing)
    apply(store, doc())

    began = time.monotonic()
    rec.reconcile_once()
    rec.reconcile_once()
    assert failing.calls == 1, "retried within the back-off"
    time.sleep(max(0.0, began + 0.75 - time.monotonic()))
    rec.reconcile_once()
    assert failing.calls == 2, "not retried after the back-off"
    second = time.monotonic()
    time.sleep(0.75)
    rec.reconcile_once()
    assert failing.calls == 2, "the back-off did not double"
    time.sleep(max(0.0, second + 1.35 - time.monotonic()))
    rec.reconcile_once()
    assert failing.calls == 3
    assert delays == [0, 1, 2]
    assert rollouts.status(store, SVC, "iris").state == PROGRESSING  # not failed
    assert len(events(store, "ReconcileFailed")) == 1, "one event per cause, not per attempt"

    apply(store, doc(replicas=2))  # a changed spec does not wait for the back-off
    rec.reconcile_once()
    assert failing.calls == 4


def test_a_deleted_object_is_never_held(store: Store, rec: Reconciler,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever stops a removal is retried: a deleted object must go."""
    monkeypatch.setattr(reconciler_module, "build_backoff", lambda _failures: 0.1)
    failing = Injected(SpecError(REFUSED))
    monkeypatch.setattr(rec, "reconcile_object", failing)
    apply(store, doc())
    with store.tx() as tx:
        tx.delete_object(SVC, "iris")
    rec.reconcile_once()
    time.sleep(0.2)
    rec.reconcile_once()
    assert failing.calls == 2


def test_a_permanent_build_failure_is_not_rebuilt_until_the_spec_changes(
        store: Store, rec: Reconciler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that can never succeed for this spec: one attempt, the rollout failed with the
    cause; a changed spec builds at once."""
    monkeypatch.setattr(reconciler_module, "build_backoff", lambda _failures: 0.05)
    built: list[str] = []
    cause = "spec.model: model iris@3 is not in the model registry"

    def build_image(service: InferenceService, **_kw: Any) -> Any:
        built.append(service.metadata.name)
        raise BuildError(cause, permanent=True)

    monkeypatch.setattr(reconciler_module, "build_image", build_image)
    model = tmp_path / "iris.onnx"
    model.write_bytes(b"unused: the build is injected")
    apply(store, doc(model=str(model)))
    deadline = time.monotonic() + 10
    while rollouts.status(store, SVC, "iris").state != FAILED:
        assert time.monotonic() < deadline, rollouts.status(store, SVC, "iris")
        rec.reconcile_once()
        time.sleep(0.05)
    for _ in range(5):
        time.sleep(0.06)
        rec.reconcile_once()
    assert len(built) == 1, "a permanent build failure was built again"
    status = rollouts.status(store, SVC, "iris")
    assert cause in status.message and "not retried until the spec changes" in status.message
    assert len(events(store, "BuildFailed")) == 1

    apply(store, doc(model=str(model), replicas=2))
    deadline = time.monotonic() + 10
    while len(built) < 2:
        assert time.monotonic() < deadline, "a changed spec did not build"
        rec.reconcile_once()
        time.sleep(0.05)
