"""Autoscaling through a real daemon: from zero, up under load, back to zero.

The daemon's own sampler reads the real endpoint; replicas are real model servers, as host
processes or runc containers (a normal start from zero, issue 11 part 5). Short windows
(stable 6 s, grace 2 s) keep it under a minute.
"""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

import pytest
from control_helpers import until
from daemon_support import ROW, Load, event_reasons, replicas, running_daemon

from uniframe.control.states import READY


def autoscaled(port: int, runtime: str) -> str:
    return f"""
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {{name: iris}}
spec:
  model: iris@1
  runtime: {runtime}
  servicePort: {port}
  healthCheck: {{periodSeconds: 1}}
  autoscaling: {{min: 0, max: 3, target: 1, stableWindow: 6s, scaleToZeroGracePeriod: 2s}}
"""


def infer(port: int) -> tuple[int, float]:
    began = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v2/models/iris/infer", ROW, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body[:300]
        assert json.loads(body)["outputs"]
        return resp.status, time.monotonic() - began
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["process", pytest.param("container", marks=pytest.mark.root)])
def test_zero_to_load_and_back_to_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       runtime: str) -> None:
    with running_daemon(tmp_path, monkeypatch, str(tmp_path / "state.db")) as d:
        try:
            d.apply(autoscaled(d.service_port, runtime))
            until("the image is built", lambda: "Built" in event_reasons(d), 300)
            time.sleep(2)
            assert replicas(d) == []  # min 0 and no request yet: nothing runs

            _, first = infer(d.service_port)  # held at zero, answered by a replica started for it
            assert [r.state for r in replicas(d)] == [READY]

            peak = 0
            with Load(d.service_port, threads=6) as load:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and peak < 3:
                    peak = max(peak, sum(r.state == READY for r in replicas(d)))
                    time.sleep(0.3)
            assert load.failures == [], load.failures[:5]
            assert peak == 3, f"6 clients at target 1 reached only {peak} ready replicas"
            scale = d.get("/v1/objects/InferenceService/iris")["status"]["autoscaling"]
            assert (scale["min"], scale["max"], scale["metric"]) == (0, 3, "concurrency")

            # idle: 6 s until the stable window is empty, halving, 2 s grace at one, then zero
            began = time.monotonic()
            until("idle scales to zero", lambda: replicas(d) == [], 60)
            idle = time.monotonic() - began
            assert idle >= 6 + 2, idle
            reasons = event_reasons(d)
            assert {"ScaledUp", "ScaledDown", "ScaledToZero"} <= set(reasons), reasons
            metrics = d.metrics()
            assert metrics['uniframe_autoscaler_desired_replicas{service="iris",metric="concurrency"}'] == 0

            _, again = infer(d.service_port)  # from zero once more: a normal start
            print(f"{runtime}: first request from zero: {first:.2f} s, second: {again:.2f} s, "
                  f"idle to zero: {idle:.1f} s")
        except AssertionError:
            print(d.log()[-4000:])
            raise
