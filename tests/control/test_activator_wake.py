"""The daemon side of the activator: a held request wakes the reconciler at once, across restarts.

The endpoint processes are real (``python -m uniframe.control.proxy``); the
daemon side is :class:`Endpoints` and a :class:`Reconciler` in this process,
its replicas the in-memory fake's (``fake_runtime.py``), so what is measured
is the wake itself: from a request's arrival at a service with no ready
replica to the start of the reconciler's pass, with the period far enough
away that only the wake can explain a quick pass.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from control_helpers import until
from fake_runtime import fake_registry

from uniframe.build.examples import write_iris
from uniframe.build.store import ImageStore
from uniframe.control.endpoints import Activation, Endpoints, activation_of
from uniframe.control.proxy.unixsock import bind_private, private_dir
from uniframe.control.reconciler import READY, Reconciler
from uniframe.control.store import ObjectRecord, Store
from uniframe.runtime.verify import free_port
from uniframe.spec import load_data

SVC = "InferenceService"
ROW = json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                              "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()


def _send(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
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


def test_activation_settings_come_from_the_stored_spec() -> None:
    assert activation_of({"spec": {"autoscaling": {"min": 0, "max": 2, "activationTimeout": 5.0}}},
                         queue_limit=10) == Activation(5.0, 10)
    assert activation_of({"spec": {"replicas": 2}}) == Activation()
    assert Activation().timeout == 30.0


def test_endpoints_call_back_once_per_burst_and_again_after_a_daemon_restart(tmp_path: Path) -> None:
    root = tmp_path / "st" / "endpoints"
    with Store.open(str(tmp_path / "state.db")) as store:
        first = Endpoints(store, root)
        heard: list[tuple[str, float]] = []
        first.on_demand(lambda service: heard.append((service, time.monotonic())))
        ep = first.sync("svc", None, [], None, Activation(20.0, 50))
        st = ep.status()
        assert (st.activation_timeout, st.queue_limit) == (20.0, 50)

        began = time.monotonic()
        burst = [_send(ep.port) for _ in range(10)]
        until("ten held", lambda: ep.status().held == 10, 10)
        time.sleep(0.5)
        assert [s for s, _ in heard] == ["svc"]  # one call for the burst
        wake_ms = (heard[0][1] - began) * 1000
        assert wake_ms < 100, wake_ms

        first.close()  # the daemon dies; the endpoint keeps holding the ten
        heard_after: list[tuple[str, float]] = []
        second = Endpoints(store, root)  # the next daemon's first pass attaches it again
        second.on_demand(lambda service: heard_after.append((service, time.monotonic())))
        try:
            attached = time.monotonic()
            again = second.sync("svc", None, [], None, Activation(20.0, 50))
            assert again.port == ep.port and again.pid is None  # the same process, attached
            until("the new daemon is told", lambda: heard_after, 5)
            told_ms = (heard_after[0][1] - attached) * 1000
            assert [s for s, _ in heard_after] == ["svc"] and told_ms < 200, (heard_after, told_ms)
            assert again.status().held == 10
            print(f"endpoint to callback: {wake_ms:.2f} ms; told after re-attach in {told_ms:.1f} ms")
        finally:
            for s in burst:
                s.close()
            second.remove("svc")
            second.close()


def test_an_endpoint_left_by_a_daemon_older_than_the_activator_is_replaced(tmp_path: Path) -> None:
    """Endpoints outlive daemons: one started before the activator existed answers ``status``
    without its fields and knows neither ``configure`` nor ``subscribe``. The new daemon must
    not fail every pass on it: it stops it (its requests in flight finish) and starts one that
    holds requests and wakes it."""
    root = tmp_path / "st" / "endpoints"
    port = free_port()
    old_status = {"service": "svc", "host": "127.0.0.1", "port": port, "admin_port": None,
                  "requests": 0, "codes": {}, "retries": 0, "upstream_errors": 0, "queued": 0,
                  "clients": 0, "weights": {}, "backends": []}
    commands: list[str] = []
    with Store.open(str(tmp_path / "state.db")) as store:
        with store.tx() as tx:
            tx.assign_endpoint("svc", port)
        endpoints = Endpoints(store, root)
        path = endpoints.control_path("svc")
        private_dir(root)
        listener = bind_private(path, 4)

        def old_endpoint() -> None:
            while True:
                conn, _ = listener.accept()
                with conn, conn.makefile("rwb") as f:
                    for line in f:
                        op = json.loads(line)["op"]
                        commands.append(op)
                        reply: dict[str, Any] = (
                            {"ok": True} if op in ("status", "stop", "set_backends")
                            else {"ok": False, "error": f"unknown command {op!r}"})
                        if op == "status":
                            reply["status"] = old_status
                        f.write(json.dumps(reply).encode() + b"\n")
                        f.flush()
                        if op == "stop":
                            listener.close()
                            path.unlink()
                            return

        serving = threading.Thread(target=old_endpoint, daemon=True)
        serving.start()
        try:
            ep = endpoints.sync("svc", None, [], None, Activation(5.0))
            serving.join(5)
            assert commands[-1] == "stop" and "configure" not in commands
            st = ep.status()
            assert (st.port, st.activation_timeout) == (port, 5.0)  # a new process, same port
            assert ep.pid is not None
        finally:
            endpoints.remove("svc")
            endpoints.close()


@pytest.fixture
def reconciler(tmp_path: Path) -> Iterator[tuple[Store, Reconciler]]:
    store = Store.open(tmp_path / "state.db")
    rec = Reconciler(store, state_root=tmp_path / "st", build_store=ImageStore(tmp_path / "img"),
                     registry=fake_registry())
    try:
        yield store, rec
    finally:
        store.close()


def test_a_request_at_zero_starts_a_pass_at_once_and_is_answered(
        tmp_path: Path, reconciler: tuple[Store, Reconciler], monkeypatch: pytest.MonkeyPatch) -> None:
    store, rec = reconciler
    model = write_iris(tmp_path / "model")
    doc = {"apiVersion": "uniframe.dev/v1alpha1", "kind": SVC, "metadata": {"name": "iris"},
           "spec": {"model": {"uri": str(model)}, "runtime": "process",
                    "autoscaling": {"min": 0, "max": 1, "activationTimeout": "20s"}}}
    with store.tx() as tx:
        tx.apply_object(SVC, "iris", load_data(doc).spec.model_dump(mode="json", by_alias=True,
                                                                     exclude_none=True))

    def built() -> bool:
        rec.reconcile_once()
        return rec.autoscalers.desired("iris") is not None  # tracked once its image exists

    until("the image is built", built, 300)
    rec.reconcile_once()
    with store.tx(readonly=True) as tx:
        assert tx.list_replicas(SVC, "iris") == []  # min 0, no request: nothing runs
    port = rec.endpoints.status("iris").port  # type: ignore[union-attr]
    assert rec.endpoints.status("iris").activation_timeout == 20.0  # type: ignore[union-attr]

    passes: list[float] = []
    original = rec.reconcile_object

    def timed(obj: ObjectRecord) -> None:
        passes.append(time.monotonic())
        original(obj)

    monkeypatch.setattr(rec, "reconcile_object", timed)
    period = 2.0
    loop = threading.Thread(target=rec.run, kwargs={"period": period}, daemon=True)
    loop.start()
    try:
        until("the loop's first pass", lambda: passes, 10)
        time.sleep(0.2)  # the next pass by the period is 1.8 s away from here
        began = time.monotonic()
        answer: list[Any] = []
        client = threading.Thread(target=lambda: answer.append(_status_of(_send(port))))
        client.start()
        until("a pass after the request", lambda: [p for p in passes if p > began], 5)
        woke = min(p for p in passes if p > began) - began
        client.join(30)
        answered = time.monotonic() - began
        assert answer == [200]
        assert woke < 0.3, f"the pass began {woke * 1000:.0f} ms after the request (period {period} s)"
        # the replica's readiness is seen when the endpoint finds it answering, not a period later
        assert answered < period / 2, f"answered after {answered:.2f} s (period {period} s)"
        with store.tx(readonly=True) as tx:
            assert [r.state for r in tx.list_replicas(SVC, "iris")] == [READY]
        print(f"request at zero to reconciler pass start: {woke * 1000:.1f} ms; answered after "
              f"{answered:.2f} s (fake replica, period {period} s)")
    finally:
        with store.tx() as tx:
            tx.delete_object(SVC, "iris")
        rec.wake()
        until("the service is gone", lambda: rec.endpoints.url("iris") is None and not passes_left(store),
              60)
        rec.stop()
        loop.join(30)


def passes_left(store: Store) -> bool:
    with store.tx(readonly=True) as tx:
        return tx.get_object(SVC, "iris", include_deleted=True) is not None
