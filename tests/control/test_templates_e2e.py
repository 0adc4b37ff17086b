"""Snapshot templates through a real daemon on the QEMU microVM: a unikernel service at zero
answers a request through a clone restored from its revision's template.

The first request from zero boots a replica (no template yet); once it is ready and has
answered the warm-up inference it becomes the template. Idle, the service scales to zero;
the next request is answered by a restored clone, not a boot.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from control_helpers import until
from daemon_support import event_reasons, replicas, running_daemon
from test_autoscaling_e2e import infer

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def spec(port: int) -> str:
    return f"""
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {{name: iris}}
spec:
  model: iris@1
  runtime: unikernel
  servicePort: {port}
  healthCheck: {{periodSeconds: 1}}
  autoscaling: {{min: 0, max: 2, target: 1, stableWindow: 6s, scaleToZeroGracePeriod: 2s,
                activationTimeout: 180s}}
"""


def test_a_unikernel_at_zero_answers_through_a_restored_clone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_daemon(tmp_path, monkeypatch, str(tmp_path / "state.db")) as d:
        try:
            d.apply(spec(d.service_port))
            until("the image is built", lambda: "Built" in event_reasons(d), 900)
            _, booted = infer(d.service_port)  # from zero with no template: a boot
            until("the template is taken", lambda: "TemplateTaken" in event_reasons(d), 120)
            assert "Restored" not in event_reasons(d)
            until("idle scales to zero", lambda: replicas(d) == [], 90)
            templates = list((tmp_path / "state" / "templates").glob("*.json"))
            assert [p.name for p in templates] == ["iris.json"]

            began = time.monotonic()
            _, restored = infer(d.service_port)
            reasons = event_reasons(d)
            assert "Restored" in reasons, reasons
            assert "RestoreFailed" not in reasons, reasons
            print(f"unikernel from zero: boot {booted:.2f} s, restored clone {restored:.2f} s "
                  f"({time.monotonic() - began:.2f} s)")
            assert restored < booted
        except AssertionError:
            print(d.log()[-6000:])
            raise
