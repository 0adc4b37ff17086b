"""The activator through a real daemon: scale to zero under load loses nothing; a held request
survives a daemon restart. Replicas are real model servers (process runtime)."""

from __future__ import annotations

import http.client
import socket
import time
from pathlib import Path

import pytest
from control_helpers import until
from daemon_support import ROW, Daemon, Load, event_reasons, replicas, running_daemon, settled, spec

from uniframe.control.proxy import Endpoint, EndpointError
from uniframe.control.states import READY


def _endpoint(d: Daemon) -> Endpoint:
    return Endpoint.attach(Path(d.env["UNIFRAME_STATE"]) / "endpoints" / "iris.sock")


def _held(d: Daemon) -> int:
    ep = _endpoint(d)
    try:
        return ep.status().held
    finally:
        ep.close()


def _send(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: iris\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(ROW), ROW))
    return sock


def _status_of(sock: socket.socket) -> int:
    resp = http.client.HTTPResponse(sock)
    try:
        resp.begin()
        resp.read()
        return resp.status
    finally:
        sock.close()


@pytest.mark.slow
def test_scaling_to_zero_under_load_drains_holds_and_loses_no_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_daemon(tmp_path, monkeypatch, str(tmp_path / "state.db"), models=1) as d:
        try:
            d.apply(spec(1, d.service_port, replicas=1))
            until("one replica serves", settled(d, 1, replicas=1), 300)
            with Load(d.service_port, threads=4) as load:
                until("requests flow", lambda: load.total() > 20, 30)
                d.apply(spec(1, d.service_port, replicas=0))  # the last replica goes
                until("the last replica is stopped", lambda: replicas(d) == [], 30)
                until("every client is held", lambda: _held(d) == 4, 10)
                answered = load.total()
                time.sleep(1.0)
                assert load.total() == answered and _held(d) == 4  # held, not refused
                d.apply(spec(1, d.service_port, replicas=1))  # a replica for them (the autoscaler's job)
                until("the held requests are answered", lambda: load.total() > answered + 20, 30)
            assert load.failures == [], load.failures[:5]
            assert "ReplicaRemoved" in event_reasons(d)
        except AssertionError:
            print(d.log()[-4000:])
            raise


@pytest.mark.slow
def test_a_request_held_while_the_daemon_is_down_wakes_the_next_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_daemon(tmp_path, monkeypatch, str(tmp_path / "state.db"), models=1) as d:
        try:
            d.apply(_autoscaled(d.service_port))
            until("the image is built", lambda: "Built" in event_reasons(d), 300)
            until("the endpoint runs", lambda: d.get("/v1/objects/InferenceService/iris") is not None
                  and _endpoint_up(d), 30)
            time.sleep(1.5)
            assert replicas(d) == []  # min 0, no request yet

            d.kill()  # the endpoint keeps serving: it holds the request
            held = _send(d.service_port)
            until("the request is held", lambda: _held(d) == 1, 10)
            time.sleep(1.0)
            assert replicas(d) == [] and _held(d) == 1  # nobody to start a replica

            began = time.monotonic()
            d.start()
            assert _status_of(held) == 200
            after = time.monotonic() - began
            assert [r.state for r in replicas(d)] == [READY]
            print(f"held across a daemon restart: answered {after:.2f} s after the new daemon "
                  "was started (its start-up included)")
        except AssertionError:
            print(d.log()[-4000:])
            raise


def _autoscaled(port: int) -> str:
    return f"""
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {{name: iris}}
spec:
  model: iris@1
  runtime: process
  servicePort: {port}
  healthCheck: {{periodSeconds: 1}}
  autoscaling: {{min: 0, max: 1, activationTimeout: 40s}}
"""


def _endpoint_up(d: Daemon) -> bool:
    try:
        _held(d)
    except EndpointError:
        return False
    return True
