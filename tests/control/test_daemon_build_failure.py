"""A model that cannot be built, through a real daemon: one failure, visible, retried later.

Probing found a daemon that rebuilt a broken model on every pass (330
``Building`` events in 10 s, no failure event, no error counted, the rollout
"progressing" with no reason). What the user must see instead: one build,
one event naming the cause, the rollout ``failed`` with that cause in
``get``, the reconcile error counter up, and a fixed spec rolling out at once.
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import pytest
from control_helpers import until
from daemon_support import ROW, SVC, Daemon, open_store, running_daemon, settled

from uniframe.build.examples import write_iris

CAUSE = "is not a model ONNX Runtime can load"


def service(model: Path, port: int) -> str:
    return f"""
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {{name: iris}}
spec:
  model: {{uri: {model}}}
  runtime: process
  replicas: 1
  servicePort: {port}
"""


def reasons(d: Daemon, reason: str) -> list[str]:
    with open_store(d) as store, store.tx(readonly=True) as tx:
        return [e.reason for e in tx.events(SVC, "iris") if e.reason == reason]


def test_a_model_that_fails_to_build_fails_once_visibly_and_recovers_when_fixed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "random.onnx"
    bad.write_bytes(os.urandom(4096))
    with running_daemon(tmp_path, monkeypatch, str(tmp_path / "state" / "state.db")) as d:
        began = time.time()
        d.apply(service(bad, d.service_port))
        until("the rollout reads failed", lambda: d.get(f"/v1/objects/{SVC}/iris")["status"][
            "rollout"]["state"] == "failed", 30)
        time.sleep(max(0.0, began + 9 - time.time()))  # ~30 passes at the test daemon's 0.3 s

        with open_store(d) as store, store.tx(readonly=True) as tx:
            events = [e for e in tx.events(SVC, "iris") if e.time < began + 9]
        building = [e for e in events if e.reason == "Building"]
        warnings = [e for e in events if e.type == "Warning"]
        assert len(building) <= 2, [e.message for e in building]
        assert len(warnings) == 1 and CAUSE in warnings[0].message, [
            (e.reason, e.message) for e in warnings]
        rollout = d.get(f"/v1/objects/{SVC}/iris")["status"]["rollout"]
        assert rollout["state"] == "failed" and CAUSE in rollout["message"], rollout
        assert d.metrics()["uniframe_reconcile_errors_total"] >= 1

        # a fixed spec is a new revision: built at once, not after the build's back-off
        good = write_iris(tmp_path / "good")
        d.apply(service(good, d.service_port))
        until("the fixed revision builds at once", lambda: len(reasons(d, "Building")) > len(
            building) and "Built" in reasons(d, "Built"), 8)
        until("the fixed revision is rolled out", settled(d, 2, replicas=1), 60)
        req = urllib.request.Request(f"http://127.0.0.1:{d.service_port}/v2/models/iris/infer",
                                     ROW, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
