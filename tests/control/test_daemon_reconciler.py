"""The reconciler alone, in this process, driving the in-memory fake driver.

The subject here is control logic (restarts, back-off, liveness, crash loops,
builds beside passes, endpoints), so replicas are the fake's simulated ones
(``fake_runtime.py``): they answer OIP on their published ports like a model
server, and a test crashes or hangs one directly instead of signalling a
process. Each claim is still checked on what answers (HTTP through the
replica's port and the real endpoint process) and on the driver's own view,
not only on what the reconciler wrote in the store. The same scenarios against
real processes, containers and VMs are ``test_daemon_runtimes.py``,
``test_rollouts.py`` and ``test_daemon.py``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import fake_driver, fake_registry

from uniframe.build.examples import write_iris
from uniframe.build.store import ImageStore, load_image_dir
from uniframe.control import reconciler as reconciler_module
from uniframe.control import rollouts
from uniframe.control.reconciler import READY, Reconciler, backoff
from uniframe.control.states import COMPLETE, FAILED
from uniframe.control.store import ObjectRecord, ReplicaRecord, Store
from uniframe.runtime.fake import Behavior, FakeDriver
from uniframe.runtime.replica import Replica, ReplicaState
from uniframe.spec import load_data

IRIS_ROW = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                        "data": [5.1, 3.5, 1.4, 0.2]}]}


def iris_doc(model: Path, replicas: int) -> dict[str, object]:
    return {"apiVersion": "uniframe.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "iris"},
            "spec": {"model": {"uri": str(model)}, "runtime": "process", "replicas": replicas}}


def apply(store: Store, doc: dict[str, object]) -> dict[str, Any]:
    """Validate ``doc`` as the API does and store it; return the stored spec."""
    spec: dict[str, Any] = load_data(doc).spec.model_dump(mode="json", by_alias=True,
                                                            exclude_none=True)
    with store.tx() as tx:
        tx.apply_object("InferenceService", "iris", spec)
    return spec


def infer(port: int) -> dict[str, object]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/iris/infer",
                                 json.dumps(IRIS_ROW).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        result: dict[str, object] = json.loads(resp.read())
        return result


@pytest.fixture
def setup(tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Store, Reconciler, Path]]:
    # Restart back-offs of 0.25, 0.5, 1 s...: the same doubling, at a quarter of the wait.
    monkeypatch.setattr(reconciler_module, "BACKOFF_BASE", 0.25)
    store = Store.open(tmp_path / "state.db")
    rec = Reconciler(store, state_root=tmp_path / "st", build_store=ImageStore(tmp_path / "img"),
                     registry=fake_registry())
    model = write_iris(tmp_path / "model")
    try:
        yield store, rec, model
    finally:
        with store.tx() as tx:
            if tx.get_object("InferenceService", "iris") is not None:
                tx.delete_object("InferenceService", "iris")
        rec.reconcile_once()
        rec.close()
        store.close()


def starts(driver: FakeDriver, replica_id: str) -> int:
    """How often the replica was started (each start is one line of its log)."""
    return b"".join(driver.logs(replica_id)).count(b" starting\n")


def until(rec: Reconciler, store: Store, check: Callable[[list[ReplicaRecord]], bool],
          timeout: float = 60) -> list[ReplicaRecord]:
    deadline = time.monotonic() + timeout
    while True:
        rec.reconcile_once()
        with store.tx(readonly=True) as tx:
            replicas = tx.list_replicas("InferenceService", "iris")
        if check(replicas):
            return replicas
        assert time.monotonic() < deadline, f"not reached in {timeout} s: {replicas}"
        time.sleep(0.05)  # a pass over fake replicas costs next to nothing


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff(n) for n in range(3)] == [1.0, 2.0, 4.0]
    assert backoff(30) == 60.0


def test_replicas_start_answer_restart_scale_and_go(
        setup: tuple[Store, Reconciler, Path], tmp_path: Path) -> None:
    store, rec, model = setup
    doc = load_data(iris_doc(model, 2))
    with store.tx() as tx:
        tx.apply_object("InferenceService", "iris",
                        doc.spec.model_dump(mode="json", by_alias=True, exclude_none=True))
    replicas = until(rec, store, lambda rs: len(rs) == 2 and all(r.state == READY for r in rs))
    ports = {r.host_port for r in replicas}
    assert len(ports) == 2
    for r in replicas:
        assert r.host_port is not None
        assert "outputs" in infer(r.host_port)

    # kill -9 one replica: it comes back on the same port, counted
    driver = fake_driver(tmp_path / "st")
    victim = replicas[0]
    driver.crash(victim.id)
    replicas = until(rec, store, lambda rs: any(r.id == victim.id and r.restarts == 1
                                                and r.state == READY for r in rs))
    assert len(replicas) == 2
    assert starts(driver, victim.id) == 2
    assert victim.host_port is not None and "outputs" in infer(victim.host_port)
    with store.tx(readonly=True) as tx:
        reasons = [e.reason for e in tx.events(replica_id=victim.id)]
    assert "Died" in reasons and "Restarted" in reasons

    # two more quick deaths: the third in a row is a crash loop, retried at longer back-off
    for n in (2, 3):
        driver.crash(victim.id)
        until(rec, store, lambda rs, n=n: any(r.id == victim.id and r.restarts == n
                                              and r.state == READY for r in rs))
    with store.tx(readonly=True) as tx:
        reasons = [e.reason for e in tx.events(replica_id=victim.id)]
    assert reasons.count("Died") == 2 and reasons.count("CrashLoop") == 1
    assert reasons.count("Restarted") == 3
    with store.tx(readonly=True) as tx:
        events = tx.events(replica_id=victim.id)
    loop = next(e for e in events if e.reason == "CrashLoop")
    retry = next(e for e in events if e.reason == "Restarted" and e.id > loop.id)
    assert retry.time - loop.time >= backoff(2) - 0.1  # waited out the back-off

    # a second pass over a converged object starts nothing
    rec.reconcile_once()
    assert len(driver.list()) == 2

    # scale down to one, then delete: processes and records go
    with store.tx() as tx:
        obj = tx.get_object("InferenceService", "iris")
        assert obj is not None
        tx.update_object("InferenceService", "iris",
                         {**obj.spec, "spec": {**obj.spec["spec"], "replicas": 1}},
                         generation=obj.generation)
    (survivor,) = until(rec, store, lambda rs: len(rs) == 1)
    assert survivor.id in {r.id for r in replicas}  # scaling kept the image and a replica
    assert len(driver.list()) == 1
    with store.tx() as tx:
        tx.delete_object("InferenceService", "iris")
    rec.reconcile_once()
    assert driver.list() == []
    with store.tx(readonly=True) as tx:
        assert tx.list_replicas() == []
        assert tx.get_object("InferenceService", "iris", include_deleted=True) is None


def test_a_hung_replica_fails_its_liveness_checks_and_is_restarted(
        setup: tuple[Store, Reconciler, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconciler_module, "HUNG_STOP_TIMEOUT", 0.5)  # a hung replica is forced
    store, rec, model = setup
    doc = iris_doc(model, 1)
    doc["spec"]["healthCheck"] = {"periodSeconds": 0.5, "timeoutSeconds": 0.5,  # type: ignore[index]
                                  "failureThreshold": 2}
    apply(store, doc)
    (replica,) = until(rec, store, lambda rs: len(rs) == 1 and rs[0].state == READY)
    driver = fake_driver(tmp_path / "st")
    driver.hang(replica.id)  # alive to the driver, deaf to HTTP, as after SIGSTOP
    try:
        (after,) = until(rec, store, lambda rs: rs[0].restarts == 1 and rs[0].state == READY)
    except AssertionError:
        with store.tx(readonly=True) as tx:
            print("\n".join(f"{e.time:.2f} {e.reason}: {e.message}" for e in tx.events()))
        raise
    assert starts(driver, replica.id) == 2
    assert b"killed" in b"".join(driver.logs(replica.id))  # the hung run had to be forced
    assert after.host_port is not None and "outputs" in infer(after.host_port)
    with store.tx(readonly=True) as tx:
        events = tx.events(replica_id=replica.id)
    failed = [e for e in events if e.reason == "LivenessFailed"]
    assert len(failed) == 1 and "2 health checks in a row failed" in failed[0].message


def test_objects_are_reconciled_in_parallel_and_each_serially(
        setup: tuple[Store, Reconciler, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow object (an image build) does not hold up another; one object never runs twice at once."""
    store, rec, _ = setup
    running: dict[str, int] = {}
    overlap: list[str] = []
    finished: list[tuple[str, float]] = []
    lock = threading.Lock()

    def fake(obj: ObjectRecord) -> None:
        with lock:
            running[obj.name] = running.get(obj.name, 0) + 1
            if running[obj.name] > 1:
                overlap.append(obj.name)
        time.sleep(1.5 if obj.name == "slow" else 0.05)
        with lock:
            running[obj.name] -= 1
            finished.append((obj.name, time.monotonic()))

    monkeypatch.setattr(rec, "reconcile_object", fake)
    with store.tx() as tx:
        for name in ("slow", "quick"):
            tx.apply_object("InferenceService", name, {"kind": "InferenceService",
                                                       "metadata": {"name": name}, "spec": {}})
    began = time.monotonic()
    loop = threading.Thread(target=rec.run, args=(0.05,))
    loop.start()
    try:
        until_true(lambda: sum(n == "quick" for n, _ in finished) >= 5, 10)
        quick_done = [t for n, t in finished if n == "quick"][4]
        assert quick_done - began < 1.4  # five passes of "quick" while "slow" still ran its first
        until_true(lambda: sum(n == "slow" for n, _ in finished) >= 2, 10)
    finally:
        rec.stop()
        loop.join(10)
    assert overlap == []
    with store.tx() as tx:
        tx.delete_object("InferenceService", "slow")
        tx.delete_object("InferenceService", "quick")
        tx.purge_object("InferenceService", "slow")
        tx.purge_object("InferenceService", "quick")


def until_true(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time limit"
        time.sleep(0.02)


def _dies_if_broken(replica: Replica) -> Behavior:
    """A replica whose image carries ``BROKEN`` in its environment dies right after it starts
    (as a server whose Python cannot start does); any other behaves."""
    assert replica.config.image.path is not None
    env = load_image_dir(replica.config.image.path).manifest.get("env", {})
    return Behavior(crash_after=0.05) if "BROKEN" in env else Behavior()


def test_a_first_deployment_that_cannot_start_fails_visibly_and_recovers_when_fixed(
        setup: tuple[Store, Reconciler, Path], tmp_path: Path) -> None:
    store, rec, model = setup
    fake_driver(tmp_path / "st", _dies_if_broken)
    doc = iris_doc(model, 1)
    doc["spec"]["env"] = {"BROKEN": "1"}  # type: ignore[index]
    apply(store, doc)
    until(rec, store, lambda rs: rollouts.status(store, "InferenceService", "iris").state == FAILED)
    status = rollouts.status(store, "InferenceService", "iris")
    assert "keeps dying" in status.message and "fix the spec" in status.message
    apply(store, iris_doc(model, 1))
    until(rec, store, lambda rs: rollouts.status(store, "InferenceService", "iris").state
          == COMPLETE and len(rs) == 1 and rs[0].state == READY)


def test_a_killed_endpoint_comes_back_on_the_same_port(
        setup: tuple[Store, Reconciler, Path]) -> None:
    store, rec, model = setup
    apply(store, iris_doc(model, 1))
    until(rec, store, lambda rs: len(rs) == 1 and rs[0].state == READY)
    with store.tx(readonly=True) as tx:
        endpoint = tx.get_endpoint("iris")
    assert endpoint is not None
    assert "outputs" in infer(endpoint.host_port)
    ep = rec.endpoints.ensure("iris")
    assert ep.pid is not None
    os.kill(ep.pid, signal.SIGKILL)
    if ep.process is not None:
        ep.process.wait()  # reap it: this process started it
    rec.reconcile_once()
    again = rec.endpoints.ensure("iris")
    assert again.pid != ep.pid and again.port == endpoint.host_port
    assert "outputs" in infer(endpoint.host_port)


def test_running_replicas_are_tended_while_the_next_revision_builds(
        setup: tuple[Store, Reconciler, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A build runs beside the passes: a replica killed meanwhile is restarted before it ends."""
    store, rec, model = setup
    first = apply(store, iris_doc(model, 1))
    (old,) = until(rec, store, lambda rs: len(rs) == 1 and rs[0].state == READY)

    release = threading.Event()
    real_build = reconciler_module.build_image

    def slow_build(*args: Any, **kwargs: Any) -> Any:
        release.wait(60)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(reconciler_module, "build_image", slow_build)
    second = {**first, "spec": {**first["spec"], "env": {"REVISION": "2"}}}
    with store.tx() as tx:
        tx.apply_object("InferenceService", "iris", second)
    rec.reconcile_once()  # starts the build, which now waits
    driver = fake_driver(tmp_path / "st")
    driver.crash(old.id)
    assert driver.inspect(old.id).state is ReplicaState.CRASHED
    until(rec, store, lambda rs: len(rs) == 1 and rs[0].id == old.id and rs[0].restarts == 1
          and rs[0].state == READY)
    assert not release.is_set()  # restarted while the build was still under way
    release.set()
    (new,) = until(rec, store, lambda rs: len(rs) == 1 and rs[0].id != old.id
                   and rs[0].state == READY)
    assert new.revision != old.revision
    with store.tx(readonly=True) as tx:
        reasons = [e.reason for e in tx.events("InferenceService", "iris")]
    last_built = len(reasons) - 1 - reasons[::-1].index("Built")
    assert reasons.index("Restarted") < last_built  # the restart did not wait for the build


def test_deleting_a_service_also_ends_an_endpoint_nobody_holds(
        setup: tuple[Store, Reconciler, Path]) -> None:
    """An endpoint process left by a crashed daemon, unreachable on its socket, still goes."""
    store, rec, model = setup
    apply(store, iris_doc(model, 1))
    until(rec, store, lambda rs: len(rs) == 1 and rs[0].state == READY)
    ep = rec.endpoints.ensure("iris")
    assert ep.process is not None
    rec.endpoints.close()  # forget it, as a crashed daemon would
    rec.endpoints.control_path("iris").unlink()  # and make it unreachable
    with store.tx() as tx:
        tx.delete_object("InferenceService", "iris")
    rec.reconcile_once()
    assert ep.process.wait(10) == -signal.SIGKILL
