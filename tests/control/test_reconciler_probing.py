"""Control-plane bugs found by probing a running daemon (issue 9, part 3), one test each.

Two services that differ only in name must not share an image, and a replica
that serves another model must never read ready; ``last_pass_seconds`` is
the duration of a whole pass over every object, not of one object's part.
Replicas are the in-memory fake's (``fake_runtime.py``): the subject is what
the reconciler decides, and the fake answers for the model its image names.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_runtime import fake_registry

from uniframe.build.examples import write_iris
from uniframe.build.store import ImageStore
from uniframe.control import rollouts
from uniframe.control.reconciler import READY, Reconciler, build_backoff
from uniframe.control.states import COMPLETE, FAILED
from uniframe.control.store import ObjectRecord, ReplicaRecord, Store
from uniframe.control.targets import service_target
from uniframe.spec import InferenceService, load_data

SVC = "InferenceService"
ROW = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                   "data": [5.1, 3.5, 1.4, 0.2]}]}


def service_doc(name: str, model: Path) -> dict[str, Any]:
    return {"apiVersion": "uniframe.dev/v1alpha1", "kind": SVC, "metadata": {"name": name},
            "spec": {"model": {"uri": str(model)}, "runtime": "process", "replicas": 1}}


def apply(store: Store, doc: dict[str, Any]) -> None:
    """Validate ``doc`` as the API does and store it."""
    spec = load_data(doc).spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    with store.tx() as tx:
        tx.apply_object(SVC, doc["metadata"]["name"], spec)


def infer(port: int, model: str) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer",
                                 json.dumps(ROW).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


@pytest.fixture
def reconciler(tmp_path: Path) -> Iterator[tuple[Store, Reconciler]]:
    store = Store.open(tmp_path / "state.db")
    rec = Reconciler(store, state_root=tmp_path / "st", build_store=ImageStore(tmp_path / "img"),
                     registry=fake_registry())
    try:
        yield store, rec
    finally:
        with store.tx() as tx:
            for obj in tx.list_objects():
                tx.delete_object(obj.kind, obj.name)
        rec.reconcile_once()
        rec.close()
        store.close()


def test_two_services_that_differ_only_in_name_each_serve_their_own_model(
        reconciler: tuple[Store, Reconciler], tmp_path: Path) -> None:
    """The same model file under two names: each endpoint answers for its own name."""
    store, rec = reconciler
    model = write_iris(tmp_path / "model")
    for name in ("alpha", "beta"):
        apply(store, service_doc(name, model))
    deadline = time.monotonic() + 90
    while True:
        rec.reconcile_once()
        with store.tx(readonly=True) as tx:
            replicas = tx.list_replicas()
        if len(replicas) == 2 and all(r.state == READY for r in replicas):
            break
        assert time.monotonic() < deadline, replicas
        time.sleep(0.3)
    assert len({r.image_digest for r in replicas}) == 2  # one image per name
    for name in ("alpha", "beta"):
        with store.tx(readonly=True) as tx:
            endpoint = tx.get_endpoint(name)
        assert endpoint is not None
        answer = infer(endpoint.host_port, name)
        assert answer["model_name"] == name and "outputs" in answer


class _ServesAlpha(http.server.BaseHTTPRequestHandler):
    """A server that is healthy but serves only the model ``alpha``."""

    def do_GET(self) -> None:
        ok = self.path in ("/v2/health/ready", "/v2/models/alpha/ready")
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


def _service(name: str, **spec: Any) -> InferenceService:
    doc = {"apiVersion": "uniframe.dev/v1alpha1", "kind": SVC, "metadata": {"name": name},
           "spec": {"model": {"uri": "/m.onnx"}, "runtime": "process", **spec}}
    service = load_data(doc).spec
    assert isinstance(service, InferenceService)
    return service


def _replica(port: int) -> ReplicaRecord:
    return ReplicaRecord(id="r1", kind=SVC, name="beta", driver="process", image_digest="",
                         state="starting", desired="running", host_port=port, created_at=0.0,
                         updated_at=0.0)


def test_a_replica_serving_another_model_is_not_ready() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ServesAlpha)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rec = _replica(server.server_address[1])
        assert service_target(_service("alpha"), None, "process").probe(rec)
        assert not service_target(_service("beta"), None, "process").probe(rec)
        # a path of the user's own is probed besides the model's, not instead of it
        assert not service_target(_service("alpha", healthCheck={"path": "/nope"}), None, "process").probe(rec)
        assert not service_target(_service("beta", healthCheck={"path": "/v2/health/ready"}),
                                  None, "process").probe(rec)
    finally:
        server.shutdown()
        server.server_close()


def test_build_retries_back_off_from_ten_seconds_to_five_minutes() -> None:
    assert [build_backoff(n) for n in range(4)] == [10.0, 20.0, 40.0, 80.0]
    assert build_backoff(10) == 300.0


def test_a_failed_build_is_retried_after_its_back_off_and_the_rollout_goes_on(
        reconciler: tuple[Store, Reconciler], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same spec, its model file fixed in place: the retry after the back-off builds it."""
    from uniframe.control import reconciler as reconciler_module

    store, rec = reconciler
    monkeypatch.setattr(reconciler_module, "build_backoff", lambda _failures: 3.0)
    good = write_iris(tmp_path / "good").read_bytes()
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not an onnx model")
    apply(store, service_doc("iris", model))
    deadline = time.monotonic() + 30
    while rollouts.status(store, SVC, "iris").state != FAILED:
        assert time.monotonic() < deadline, "the rollout never read failed"
        rec.reconcile_once()
        time.sleep(0.1)
    assert "retrying in 3 s" in rollouts.status(store, SVC, "iris").message
    model.write_bytes(good)
    failed_at = time.monotonic()
    while time.monotonic() - failed_at < 1.5:  # passes within the back-off build nothing
        rec.reconcile_once()
    with store.tx(readonly=True) as tx:
        assert [e.reason for e in tx.events(SVC, "iris")].count("Building") == 1
    deadline = time.monotonic() + 60
    while True:
        rec.reconcile_once()
        status = rollouts.status(store, SVC, "iris")
        if status.state == COMPLETE and status.updated_ready == 1:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    with store.tx(readonly=True) as tx:
        reasons = [e.reason for e in tx.events(SVC, "iris")]
    assert reasons.count("Building") == 2 and reasons.count("BuildFailed") == 1
    assert rec.errors == 1


def _stub_objects(store: Store, names: tuple[str, ...]) -> None:
    with store.tx() as tx:
        for name in names:
            tx.apply_object(SVC, name, {"kind": SVC, "metadata": {"name": name}, "spec": {}})


def test_last_pass_seconds_is_the_whole_pass_over_every_object(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two objects of 0.3 s each, one at a time: the pass took 0.6 s, not 0.3 s."""
    store = Store.open(tmp_path / "state.db")
    rec = Reconciler(store, state_root=tmp_path / "st", workers=1)
    monkeypatch.setattr(rec, "reconcile_object", lambda _obj: time.sleep(0.3))
    _stub_objects(store, ("one", "two"))
    try:
        rec.reconcile_once()
        assert rec.last_pass_seconds >= 0.6
    finally:
        rec.close()
        store.close()


def test_last_pass_seconds_counts_only_passes_over_every_object(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the loop, a quick object's passes while a slow one is still running are not whole
    passes: the gauge keeps the slow pass's duration instead of flickering to the quick one's."""
    store = Store.open(tmp_path / "state.db")
    rec = Reconciler(store, state_root=tmp_path / "st", workers=4)

    def fake(obj: ObjectRecord) -> None:
        time.sleep(0.8 if obj.name == "slow" else 0.02)

    monkeypatch.setattr(rec, "reconcile_object", fake)
    _stub_objects(store, ("slow", "quick"))
    loop = threading.Thread(target=rec.run, args=(0.05,))
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while rec.last_pass_seconds == 0.0:
            assert time.monotonic() < deadline, "no pass was recorded"
            time.sleep(0.01)
        samples = []
        for _ in range(150):  # 1.5 s: two more slow passes, dozens of quick ones
            samples.append(rec.last_pass_seconds)
            time.sleep(0.01)
        assert min(samples) >= 0.8, sorted(samples)[:5]
    finally:
        rec.stop()
        loop.join(10)
        store.close()
