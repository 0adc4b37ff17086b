"""Record a load trace from a real endpoint for ``autoscaler_traces/`` (run by hand, not by pytest).

    python3 tests/control/record_autoscaler_trace.py OUT.json

Runs a real daemon with an autoscaled process-runtime iris service, drives client load in
phases (idle, 2 clients, a burst of 8, idle), and samples the endpoint's control socket once a
second exactly as the daemon's sampler does: ``[t, in flight + held, requests answered]``. The
expectations are then written by hand into the file (what the rules say this load must give).
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from control_helpers import until
from daemon_support import Load, event_reasons, running_daemon

from uniframe.control.proxy import Endpoint

PHASES = [(0, 8), (2, 15), (8, 10), (0, 25)]  # (clients, seconds)


def main(out: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="uniframe-trace-"))
    monkeypatch = pytest.MonkeyPatch()
    try:
        with running_daemon(tmp, monkeypatch, str(tmp / "state.db")) as d:
            d.apply(f"""
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {{name: iris}}
spec:
  model: iris@1
  runtime: process
  servicePort: {d.service_port}
  autoscaling: {{min: 1, max: 4, target: 1, stableWindow: 6s, scaleToZeroGracePeriod: 2s}}
""")
            until("the image is built", lambda: "Built" in event_reasons(d), 300)
            ep = Endpoint.attach(tmp / "state" / "endpoints" / "iris.sock")
            samples: list[list[float]] = []
            stop = threading.Event()

            def sample() -> None:
                began = time.monotonic()
                while not stop.wait(1.0):
                    st = ep.status()
                    samples.append([round(time.monotonic() - began, 2), st.in_flight + st.held,
                                    st.requests])

            sampler = threading.Thread(target=sample)
            sampler.start()
            for clients, seconds in PHASES:
                if clients:
                    with Load(d.service_port, threads=clients):
                        time.sleep(seconds)
                else:
                    time.sleep(seconds)
            stop.set()
            sampler.join()
            ep.close()
            out.write_text(json.dumps({"phases": PHASES, "samples": samples}, indent=None))
    finally:
        monkeypatch.undo()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
