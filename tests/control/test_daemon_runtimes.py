"""A unikernel, a container and a full-VM service under the real daemon, end to end.

The same control plane that the process-runtime tests exercise, on the
runtimes that take real time: the daemon builds the image itself, boots it
(QEMU microVM under TCG here; runc), routes the service endpoint to it,
restarts it after a kill -9 of its QEMU or container process, rolls it to a
new model version and removes everything when the service is deleted.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from daemon_support import (
    Load,
    replicas,
    running_daemon,
    settled,
    spec,
    until,
)

from uniframe.control.states import READY
from uniframe.runtime.registry import driver_for, entry_for_runtime

RUNTIMES = [
    pytest.param("container", marks=[pytest.mark.root, pytest.mark.slow]),
    pytest.param("unikernel", marks=[pytest.mark.qemu, pytest.mark.slow]),
    pytest.param("vm", marks=[pytest.mark.qemu, pytest.mark.slow, pytest.mark.root]),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_service_runs_rolls_and_recovers_under_the_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime: str) -> None:
    with running_daemon(tmp_path, monkeypatch, str(tmp_path / "state.db")) as d:
        driver = driver_for(entry_for_runtime(runtime).kind, None)  # in the daemon's state directory
        try:
            d.apply(spec(1, d.service_port, replicas=1, runtime=runtime))
            until("the image is built and its replica ready", settled(d, 1, replicas=1), 900)
            with Load(d.service_port, threads=1) as load:
                until("answers through the endpoint", lambda: load.total() >= 20)
            assert load.failures == [] and set(load.versions) == {"1"}

            (victim,) = replicas(d)
            assert victim.driver == entry_for_runtime(runtime).kind
            pid = driver.get(victim.id).pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            until("the killed replica is restarted and ready", lambda: any(
                r.id == victim.id and r.restarts >= 1 and r.state == READY
                for r in replicas(d)), 300)

            d.apply(spec(2, d.service_port, replicas=1, runtime=runtime))
            until("version 2 is rolled out", settled(d, 2, replicas=1), 900)
            with Load(d.service_port, threads=1) as load:
                until("version 2 answers", lambda: load.total() >= 20)
            assert load.failures == [] and set(load.versions) == {"2"}
            assert [r.id for r in driver.list()] == [r.id for r in replicas(d)]
        except AssertionError:
            print(d.log()[-4000:])
            raise
    assert driver.list() == []  # deleting the service removed its replicas
