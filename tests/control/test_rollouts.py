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

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import (
    SVC,
    Daemon,
    Load,
    endpoint_pid,
    event_reasons,
    open_store,
    replicas,
    revision_digest,
    rollout_status,
    running_daemon,
    server_pids,
    settled,
    spec,
    until,
)

from uniframe.control import rollouts
from uniframe.control.states import PAUSED, READY, ROLLED_BACK
from uniframe.runtime.registry import driver_for


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_target: str) -> Iterator[Daemon]:
    """A daemon on a SQLite file or on a real PostgreSQL (``store_target`` runs both)."""
    with running_daemon(tmp_path, monkeypatch, store_target) as d:
        try:
            yield d
        finally:
            for r in driver_for("process", None).list():  # a failed test leaves nothing behind
                driver_for("process", None).remove(r.id, force=True)


def test_rolling_update_and_replica_kill_under_load_fail_no_request(daemon: Daemon) -> None:
    d = daemon
    d.apply(spec(1, d.service_port))
    until("revision 1 is rolled out", settled(d, 1))
    with Load(d.service_port) as load:
        until("traffic flows", lambda: load.total() > 50)

        # kill -9 one replica under load: the endpoint retries, the daemon restarts it
        victim = replicas(d)[0]
        pid = driver_for("process", None).get(victim.id).pid
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        until("the killed replica is back", lambda: any(
            r.id == victim.id and r.restarts == 1 and r.state == READY for r in replicas(d)))

        # a rolling update to model version 2 under load
        before = load.total()
        d.apply(spec(2, d.service_port))
        until("revision 2 is rolled out", settled(d, 2), 90)
        until("version 2 answers", lambda: load.last[-20:] == ["2"] * 20)

        # kill -9 the daemon: the endpoint and the replicas keep serving
        ep_pid = endpoint_pid(d)
        d.kill()
        served = load.total()
        until("traffic flows without the daemon", lambda: load.total() > served + 100)
        d.start()
        time.sleep(2)  # a few passes of the new daemon
        until("still settled", settled(d, 2))
        assert endpoint_pid(d) == ep_pid  # adopted, not restarted
    assert load.failures == [], load.failures[:5]
    assert load.total() - before > 200
    metrics = d.metrics()
    assert metrics['uniframe_rollouts{state="complete"}'] == 1
    assert metrics['uniframe_endpoint_backends_eligible{service="iris"}'] == 2
    assert metrics['uniframe_endpoint_requests_total{service="iris"}'] > 100  # since re-adoption
    assert set(load.versions) == {"1", "2"}
    assert len(server_pids(d.root)) == 2  # no duplicate after the daemon's restart
    assert {r.revision for r in replicas(d)} == {revision_digest(d, 2)}
    reasons = event_reasons(d)
    for reason in ("Died", "Restarted", "RolloutStarted", "RolloutComplete", "ReplicaRemoved"):
        assert reason in reasons, reasons


def test_canary_promote_undo_and_automatic_rollback(daemon: Daemon) -> None:
    d = daemon
    d.apply(spec(1, d.service_port))
    until("revision 1 is rolled out", settled(d, 1))
    with Load(d.service_port, threads=2) as load:
        d.apply(spec(2, d.service_port, rollout="strategy: canary, canary: {trafficPercent: 50}"))
        until("the canary is ready", lambda: rollout_status(d).state == PAUSED)
        status = rollout_status(d)
        assert (status.updated, status.old, status.traffic_percent) == (1, 2, 50)
        load.versions.clear()
        until("requests reach both", lambda: load.total() > 400)
        share = load.versions["2"] / load.total()
        assert 0.35 < share < 0.65, load.versions

        with open_store(d) as store:
            rollouts.promote(store, SVC, "iris")
        until("the canary is promoted to all", settled(d, 2))

        with open_store(d) as store:
            rollouts.undo(store, SVC, "iris")
        until("undo rolls back to the first spec", settled(d, 3))  # renumbered as the newest
        until("version 1 answers", lambda: load.last[-20:] == ["1"] * 20)

        # a revision whose servers cannot start: the rollout fails and undoes itself
        d.apply(spec(2, d.service_port, env="env: {PYTHONHOME: /nonexistent}"))
        until("the bad rollout rolls back", lambda: rollout_status(d).state == ROLLED_BACK, 90)
        until("only good replicas remain", lambda: (
            len(rs := replicas(d)) == 2 and all(r.state == READY for r in rs)))

        # a revision whose servers start but never get ready: the progress deadline rolls back
        hang = d.root / "hang"
        hang.mkdir()
        (hang / "sitecustomize.py").write_text("import time\ntime.sleep(3600)\n")
        d.apply(spec(2, d.service_port, env=f"env: {{PYTHONPATH: {hang}}}",
                     rollout="strategy: rolling, progressDeadlineSeconds: 3"))
        until("the stuck rollout rolls back", lambda: rollout_status(d).state == ROLLED_BACK
              and "not ready within 3 s" in rollout_status(d).message, 60)
        until("only good replicas remain", lambda: (
            len(rs := replicas(d)) == 2 and all(r.state == READY for r in rs)
            and {r.revision for r in rs} == {revision_digest(d, 7)}))  # 1 2 1 2' 1 2'' 1
    assert load.failures == [], load.failures[:5]
    with open_store(d) as store, store.tx(readonly=True) as tx:
        obj = tx.get_object(SVC, "iris")
    assert obj is not None and obj.spec["spec"]["env"] == {}  # the previous spec is back
    assert obj.spec["spec"]["rollout"]["progressDeadlineSeconds"] == 3  # settings stay the user's
    assert obj.spec["spec"]["model"] == {"name": "iris", "version": 1}
    reasons = event_reasons(d)
    for reason in ("CanaryReady", "Promoted", "RollbackRequested", "RolloutFailed", "RolledBack"):
        assert reason in reasons, reasons
