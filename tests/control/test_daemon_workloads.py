"""A Workload (a user's OCI image, not built by uniframe) under the real daemon.

The same reconciler as for inference services: replicas under runc, the
workload's own HTTP health check on a mapped guest port, restarts after a
kill -9, a rolling update when the spec changes, and nothing left behind
after delete.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import tarfile
from pathlib import Path

import pytest
from control_helpers import until
from daemon_support import ROW, Daemon, running_daemon

from uniframe.build.examples import write_iris
from uniframe.build.images import build_image
from uniframe.build.store import ImageStore
from uniframe.control import rollouts
from uniframe.control.states import COMPLETE, READY
from uniframe.control.store import ReplicaRecord, Store
from uniframe.runtime.registry import driver_for
from uniframe.spec import InferenceService, load_text

KIND = "Workload"


def workload(archive: Path, model_name: str) -> str:
    return f"""
apiVersion: uniframe.dev/v1alpha1
kind: Workload
metadata: {{name: flower}}
spec:
  image: {archive}
  runtime: container
  replicas: 2
  resources: {{cpus: 1, memory: 256Mi}}
  ports: [{{guest: 9000}}]
  args: [/srv/models/iris/1/model.onnx, --name, {model_name}, --port, '9000']
  healthCheck: {{http: {{path: /v2/health/ready, port: 9000}}, periodSeconds: 1}}
"""


def oci_archive(tmp_path: Path) -> Path:
    """The iris service as an OCI archive, as another tool would hand it over."""
    write_iris(tmp_path)
    (doc,) = load_text("apiVersion: uniframe.dev/v1alpha1\nkind: InferenceService\n"
                       "metadata: {name: iris}\nspec: {model: {uri: ./iris.onnx}, "
                       "runtime: container}\n", "svc.yaml", base_dir=tmp_path)
    assert isinstance(doc.spec, InferenceService)
    image = build_image(doc.spec, source_digest=doc.digest(),
                        store=ImageStore(tmp_path / "images"))
    archive = tmp_path / "iris-layout.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("oci-layout", "index.json", "blobs"):
            tar.add(image.dir / name, arcname=name)
    return archive


def replicas(d: Daemon) -> list[ReplicaRecord]:
    with Store.open(d.store_path) as store, store.tx(readonly=True) as tx:
        return tx.list_replicas(KIND, "flower")


def settled(d: Daemon, revision: int) -> bool:
    with Store.open(d.store_path) as store:
        s = rollouts.status(store, KIND, "flower")
    return (s.state == COMPLETE and s.revision == revision and s.updated_ready == 2
            and s.old == 0)


def infer(port: int, model: str) -> list[int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", ROW,
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        return list(json.loads(resp.read())["outputs"][0]["data"])
    finally:
        conn.close()


@pytest.mark.root
@pytest.mark.slow
def test_an_oci_workload_runs_recovers_rolls_and_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = oci_archive(tmp_path)
    with running_daemon(tmp_path, monkeypatch, str(tmp_path / "state.db"), models=0) as d:
        driver = driver_for("runc", None)
        try:
            d.apply(workload(archive, "flower"))
            until("two ready replicas", lambda: settled(d, 1), 120)
            for r in replicas(d):
                assert r.host_port is not None and infer(r.host_port, "flower") == [0]

            victim = replicas(d)[0]
            pid = driver.get(victim.id).pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            until("the killed replica is back", lambda: any(
                r.id == victim.id and r.restarts == 1 and r.state == READY
                for r in replicas(d)), 120)

            d.apply(workload(archive, "flower2"))  # new args: a new revision, rolled
            until("revision 2 rolled out", lambda: settled(d, 2), 180)
            assert victim.id not in {r.id for r in replicas(d)}
            for r in replicas(d):
                assert r.host_port is not None and infer(r.host_port, "flower2") == [0]
            assert sorted(r.id for r in driver.list()) == sorted(r.id for r in replicas(d))
        except AssertionError:
            print(d.log()[-4000:])
            raise
        d.delete(KIND, "flower")
        until("the workload is gone", lambda: not replicas(d), 120)
        assert driver.list() == []
