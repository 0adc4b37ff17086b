"""Rollouts through a real daemon, under real load on the service endpoint.

The test is the operator and the client at once: a real ``uniframe daemon``
process reconciles process-runtime replicas of two registered model
versions, while client threads keep sending inference requests to the
service's one stable port. Every request must succeed, whatever the daemon
does to the replicas (a rolling update, a kill -9 of a replica, a canary,
a rollout that fails and rolls itself back) and even while the daemon
itself is killed with SIGKILL and started again.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from uniframe.build.examples import write_iris
from uniframe.control import rollouts
from uniframe.control.registry import Registry
from uniframe.control.states import COMPLETE, PAUSED, READY, ROLLED_BACK
from uniframe.control.store import ReplicaRecord, Store
from uniframe.runtime.driver import driver_for
from uniframe.runtime.verify import free_port

SVC = "InferenceService"
ROW = json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                              "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()


@dataclass
class Daemon:
    root: Path
    env: dict[str, str]
    store_path: str  # a SQLite file or a postgresql:// URL
    service_port: int
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uniframe.cli.main", "daemon", "--listen",
             f"127.0.0.1:{self.port}", "--store", self.store_path, "--period", "0.3"],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(self.root / "daemon.log").open("ab"))
        until("the daemon answers", lambda: self.get("/openapi.json") is not None, 30)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def get(self, path: str) -> Any:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
            return json.loads(resp.read())
        return None

    def apply(self, yaml_text: str) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/apply",
                                     yaml_text.encode(), {"Content-Type": "application/yaml"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200
        except urllib.error.HTTPError as exc:
            raise AssertionError(exc.read().decode()) from None

    def log(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")


def spec(version: int, port: int, *, replicas: int = 2, rollout: str = "",
         env: str = "") -> str:
    return f"""
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {{name: iris}}
spec:
  model: iris@{version}
  runtime: process
  replicas: {replicas}
  servicePort: {port}
  healthCheck: {{periodSeconds: 1}}
  rollout: {{{rollout or "strategy: rolling, maxSurge: 1, maxUnavailable: 0"}}}
  {env}
"""


def until(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


@dataclass
class Load:
    """Client threads sending inference requests to the endpoint on keep-alive connections."""

    port: int
    threads: int = 4
    versions: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    last: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(30)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._stop.is_set():
            try:
                conn.request("POST", "/v2/models/iris/infer", ROW,
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
                version = str(json.loads(body)["model_version"])
                with self._lock:
                    self.versions[version] += 1
                    self.last = [*self.last[-49:], version]
            except Exception as exc:
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                time.sleep(0.05)
        conn.close()

    def total(self) -> int:
        with self._lock:
            return sum(self.versions.values())


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_target: str) -> Iterator[Daemon]:
    """A daemon on a SQLite file or on a real PostgreSQL (``store_target`` runs both)."""
    env = {**os.environ, "UNIFRAME_DATA": str(tmp_path / "data"),
           "UNIFRAME_STATE": str(tmp_path / "state")}
    for key in ("UNIFRAME_DATA", "UNIFRAME_STATE"):
        monkeypatch.setenv(key, env[key])
    d = Daemon(tmp_path, env, store_target, free_port())
    store = Store.open(d.store_path)
    model = write_iris(tmp_path / "model")
    registry = Registry(store)
    registry.push(model, "iris", version=1)
    registry.push(model, "iris", version=2)
    store.close()
    d.start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            with contextlib.suppress(OSError, AssertionError):
                urllib.request.urlopen(urllib.request.Request(
                    f"http://127.0.0.1:{d.port}/v1/objects/{SVC}/iris", method="DELETE"),
                    timeout=10).close()
            with contextlib.suppress(AssertionError):
                until("the service is gone", lambda: not _replicas(d), 60)
            d.proc.terminate()
            d.proc.wait(30)
        for r in driver_for("process", None).list():  # a failed test leaves nothing behind
            with contextlib.suppress(Exception):
                driver_for("process", None).remove(r.id, force=True)


def _store(d: Daemon) -> Store:
    return Store.open(d.store_path)


def _replicas(d: Daemon) -> list[ReplicaRecord]:
    with _store(d) as store, store.tx(readonly=True) as tx:
        return tx.list_replicas(SVC, "iris")


def _status(d: Daemon) -> rollouts.RolloutStatus:
    with _store(d) as store:
        return rollouts.status(store, SVC, "iris")


def _reasons(d: Daemon) -> list[str]:
    with _store(d) as store, store.tx(readonly=True) as tx:
        return [e.reason for e in tx.events(SVC, "iris")]


def _settled(d: Daemon, revision: int, replicas: int = 2) -> Callable[[], bool]:
    def check() -> bool:
        s = _status(d)
        return (s.state == COMPLETE and s.revision == revision and s.updated_ready == replicas
                and s.old == 0)
    return check


def _server_pids(root: Path) -> list[int]:
    """Model servers of this test on the host, counted from /proc (not from our own records)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (p / "cmdline").read_bytes().split(b"\0")
                if argv[1:3] == [b"-m", b"uniframe.serve"] and str(root).encode() in argv[3]:
                    found.append(int(p.name))
    return found


def test_rolling_update_and_replica_kill_under_load_fail_no_request(daemon: Daemon) -> None:
    d = daemon
    d.apply(spec(1, d.service_port))
    until("revision 1 is rolled out", _settled(d, 1))
    with Load(d.service_port) as load:
        until("traffic flows", lambda: load.total() > 50)

        # kill -9 one replica under load: the endpoint retries, the daemon restarts it
        victim = _replicas(d)[0]
        pid = driver_for("process", None).get(victim.id).pid
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        until("the killed replica is back", lambda: any(
            r.id == victim.id and r.restarts == 1 and r.state == READY for r in _replicas(d)))

        # a rolling update to model version 2 under load
        before = load.total()
        d.apply(spec(2, d.service_port))
        until("revision 2 is rolled out", _settled(d, 2), 90)
        until("version 2 answers", lambda: load.last[-20:] == ["2"] * 20)

        # kill -9 the daemon: the endpoint and the replicas keep serving
        endpoint_pid = _endpoint_pid(d)
        d.kill()
        served = load.total()
        until("traffic flows without the daemon", lambda: load.total() > served + 100)
        d.start()
        time.sleep(2)  # a few passes of the new daemon
        until("still settled", _settled(d, 2))
        assert _endpoint_pid(d) == endpoint_pid  # adopted, not restarted
    assert load.failures == [], load.failures[:5]
    assert load.total() - before > 200
    assert set(load.versions) == {"1", "2"}
    assert len(_server_pids(d.root)) == 2  # no duplicate after the daemon's restart
    assert {r.revision for r in _replicas(d)} == {_revision_digest(d, 2)}
    reasons = _reasons(d)
    for reason in ("Died", "Restarted", "RolloutStarted", "RolloutComplete", "ReplicaRemoved"):
        assert reason in reasons, reasons


def _endpoint_pid(d: Daemon) -> int:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (p / "cmdline").read_bytes().split(b"\0")
                if (argv[1:3] == [b"-m", b"uniframe.control.proxy"]
                        and str(d.service_port).encode() in argv):
                    return int(p.name)
    raise AssertionError("no endpoint process")


def _revision_digest(d: Daemon, number: int) -> str:
    with _store(d) as store:
        revs = rollouts.revisions(store, SVC, "iris")
    return next(r.digest for r in revs if r.number == number)


def test_canary_promote_undo_and_automatic_rollback(daemon: Daemon) -> None:
    d = daemon
    d.apply(spec(1, d.service_port))
    until("revision 1 is rolled out", _settled(d, 1))
    with Load(d.service_port, threads=2) as load:
        d.apply(spec(2, d.service_port, rollout="strategy: canary, canary: {trafficPercent: 50}"))
        until("the canary is ready", lambda: _status(d).state == PAUSED)
        status = _status(d)
        assert (status.updated, status.old, status.traffic_percent) == (1, 2, 50)
        load.versions.clear()
        until("requests reach both", lambda: load.total() > 400)
        share = load.versions["2"] / load.total()
        assert 0.35 < share < 0.65, load.versions

        with _store(d) as store:
            rollouts.promote(store, SVC, "iris")
        until("the canary is promoted to all", _settled(d, 2))

        with _store(d) as store:
            rollouts.undo(store, SVC, "iris")
        until("undo rolls back to the first spec", _settled(d, 3))  # renumbered as the newest
        until("version 1 answers", lambda: load.last[-20:] == ["1"] * 20)

        # a revision whose servers cannot start: the rollout fails and undoes itself
        d.apply(spec(2, d.service_port, env="env: {PYTHONHOME: /nonexistent}"))
        until("the bad rollout rolls back", lambda: _status(d).state == ROLLED_BACK, 90)
        until("only good replicas remain", lambda: (
            len(rs := _replicas(d)) == 2 and all(r.state == READY for r in rs)))
    assert load.failures == [], load.failures[:5]
    with _store(d) as store, store.tx(readonly=True) as tx:
        obj = tx.get_object(SVC, "iris")
    assert obj is not None and obj.spec["spec"]["env"] == {}  # the previous spec is back
    assert obj.spec["spec"]["model"] == {"name": "iris", "version": 1}
    reasons = _reasons(d)
    for reason in ("CanaryReady", "Promoted", "RollbackRequested", "RolloutFailed", "RolledBack"):
        assert reason in reasons, reasons
