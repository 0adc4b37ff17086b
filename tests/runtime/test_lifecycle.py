"""The one replica lifecycle of runtime/driver.py, through a driver whose replica is a real shell.

The shell driver below supplies only what a driver must (launch, graceful
stop, optional forced stop, how a run ended, release) and counts its
releases, so these tests pin what the base promises every driver: reads
change nothing, the end is recorded once by whoever sees it, stop escalates
step by step and says which step ended it, remove refuses a running replica.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from uniframe.errors import RuntimeDriverError
from uniframe.runtime.driver import STATUS_FILE, Driver
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.qemu.microvm import QemuRecord
from uniframe.runtime.replica import (
    ImageRef,
    Replica,
    ReplicaConfig,
    ReplicaState,
    ReplicaStatus,
)
from uniframe.runtime.runc.driver import RuncRecord

# Says hello, then idles; SIGTERM makes it record status 0 and exit (unless told to ignore it).
POLITE = "trap 'echo 0 > code; exit 0' TERM; echo hello; while :; do sleep 0.05; done"
STUBBORN = "trap '' TERM; echo hello; while :; do sleep 0.05; done"


class ShellDriver(Driver):
    kind = "shell-test"
    log_file = "out.log"

    def __init__(self, root: Path, script: str = POLITE, forced: bool = False,
                 fail_start: bool = False) -> None:
        super().__init__(root)
        self.script, self.forced, self.fail_start = script, forced, fail_start
        self.released: list[str] = []

    def create(self, config: ReplicaConfig) -> Replica:
        replica_id, name, directory = self._allocate(config.name, "shell")
        return self._record_new(replica_id, directory, replace(config, name=name))

    def _launch(self, replica: Replica) -> tuple[Replica, subprocess.Popen[bytes]]:
        (replica.dir / "code").unlink(missing_ok=True)
        with (replica.dir / self.log_file).open("ab") as out:
            proc = subprocess.Popen(["sh", "-c", self.script], cwd=replica.dir, stdout=out,
                                    stderr=out, start_new_session=True)
        return replica, proc

    def _until_started(self, replica: Replica, proc: subprocess.Popen[bytes]) -> ProcessRef | None:
        if self.fail_start:
            raise RuntimeDriverError("the shell did not come up")
        return None

    def _ask_to_stop(self, replica: Replica, deadline: float) -> None:
        for process in self._processes(replica):
            process.signal(signal.SIGTERM)

    def _force_stop(self, replica: Replica) -> str | None:
        if not self.forced:
            return None
        for process in self._processes(replica):
            process.signal(signal.SIGKILL)
        return "stopped by force"

    def _how_it_ended(self, replica: Replica) -> ReplicaStatus:
        try:
            return ReplicaStatus(ReplicaState.EXITED, int((replica.dir / "code").read_text()))
        except (OSError, ValueError):
            return ReplicaStatus(ReplicaState.CRASHED, None, "no exit code")

    def _release(self, replica: Replica) -> None:
        self.released.append(replica.id)


WHEN = "2026-01-02T03:04:05+00:00"
CONFIG = ReplicaConfig(image=ImageRef("shell", "", Path(), Path()))


def _started(driver: ShellDriver, ref: str | None = None) -> Replica:
    """A started replica (a new one unless ``ref``) whose shell has set its trap."""
    replica = driver.start(ref or driver.create(CONFIG).id)
    deadline = time.monotonic() + 5
    while b"hello" not in b"".join(driver.logs(replica.id, offset=replica.log_offset)):
        assert time.monotonic() < deadline, "the shell never said hello"
        time.sleep(0.02)
    assert driver.released == [replica.id]  # a start first gives back what a last run left
    driver.released.clear()
    return replica


def _kill_9(replica: Replica) -> None:
    assert replica.pid is not None
    os.killpg(replica.pid, signal.SIGKILL)


def test_reads_change_nothing_and_the_end_is_recorded_once(tmp_path: Path) -> None:
    driver = ShellDriver(tmp_path)
    replica = _started(driver)
    _kill_9(replica)
    deadline = time.monotonic() + 5
    while driver.inspect(replica.id).state is ReplicaState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    before = sorted(p.name for p in replica.dir.iterdir())
    status = driver.inspect(replica.id)
    list(driver.logs(replica.id))
    driver.list()
    assert (status.state, status.detail) == (ReplicaState.CRASHED, "no exit code")
    assert sorted(p.name for p in replica.dir.iterdir()) == before  # no exit.json from a read
    assert driver.released == []                                   # nor a release

    reaped = driver.reap(replica.id)
    assert reaped.state is ReplicaState.CRASHED and reaped.finished_at is not None
    assert json.loads((replica.dir / STATUS_FILE).read_text()) == reaped.to_json()
    assert driver.released == [replica.id]
    assert driver.reap(replica.id) == reaped == driver.wait(replica.id) == driver.inspect(replica.id)
    assert ShellDriver(tmp_path).inspect(replica.id) == reaped     # another process reads the same
    assert driver.released == [replica.id]                         # released once, by the recorder


def test_graceful_stop_reads_the_drivers_status(tmp_path: Path) -> None:
    driver = ShellDriver(tmp_path)
    replica = _started(driver)
    status = driver.stop(replica.id, timeout=5)
    assert (status.state, status.exit_status, status.detail) == (ReplicaState.EXITED, 0, "")
    assert driver.released == [replica.id]
    assert not ProcessRef(replica.pid or 0, replica.pid_start_time or 0).alive()


@pytest.mark.parametrize(("forced", "detail"), [
    (True, "did not stop within 0.3 s; stopped by force"),
    (False, "did not stop within 0.3 s; killed"),
])
def test_stop_escalates_and_says_which_step_ended_it(tmp_path: Path, forced: bool, detail: str) -> None:
    driver = ShellDriver(tmp_path, STUBBORN, forced=forced)
    replica = _started(driver)
    started = time.monotonic()
    status = driver.stop(replica.id, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 3
    assert (status.state, status.detail) == (ReplicaState.CRASHED, detail)
    assert driver.inspect(replica.id) == status


def test_remove_refuses_a_running_replica_unless_forced(tmp_path: Path) -> None:
    driver = ShellDriver(tmp_path)
    replica = _started(driver)
    with pytest.raises(RuntimeDriverError, match="is running; stop it first"):
        driver.remove(replica.id)
    assert driver.inspect(replica.id).state is ReplicaState.RUNNING
    driver.remove(replica.id, force=True)
    assert not replica.dir.exists()
    assert not ProcessRef(replica.pid or 0, replica.pid_start_time or 0).alive()
    assert replica.id in driver.released


def test_a_failed_start_leaves_no_process_and_records_the_end(tmp_path: Path) -> None:
    driver = ShellDriver(tmp_path, fail_start=True)
    replica = driver.create(CONFIG)
    with pytest.raises(RuntimeDriverError, match="did not come up"):
        driver.start(replica.id)
    launched = driver.get(replica.id)
    assert launched.pid is not None and launched.pid_start_time is not None
    assert not ProcessRef(launched.pid, launched.pid_start_time).alive()
    assert driver.inspect(replica.id).state is ReplicaState.CRASHED
    assert (replica.dir / STATUS_FILE).exists()
    assert driver.released == [replica.id, replica.id]  # before the launch, and once it failed


def test_a_restart_releases_what_an_unobserved_end_left_and_reads_only_the_new_run(
        tmp_path: Path) -> None:
    driver = ShellDriver(tmp_path)
    replica = _started(driver)
    _kill_9(replica)
    driver.wait(replica.id, timeout=5)
    driver.released.clear()
    assert driver.inspect(replica.id).state is ReplicaState.CRASHED
    again = _started(driver, replica.id)  # which also checks the start released the last run
    assert again.log_offset > 0 and driver.inspect(replica.id).state is ReplicaState.RUNNING
    assert b"".join(driver.logs(replica.id, offset=again.log_offset)) == b"hello\n"
    assert driver.stop(replica.id, timeout=5).exit_status == 0


def test_logs_follow_until_the_replica_ends(tmp_path: Path) -> None:
    driver = ShellDriver(tmp_path, "echo one; sleep 0.5; echo two; echo 3 > code")
    replica = driver.start(driver.create(CONFIG).id)
    assert b"".join(driver.logs(replica.id, follow=True)) == b"one\ntwo\n"
    assert driver.wait(replica.id).exit_status == 3


def test_records_written_before_drivers_kept_their_own_fields_still_load(tmp_path: Path) -> None:
    """The daemon re-adopts replicas an older version started: top-level accel, guest_ip, tap."""
    old = {"id": "abc123", "name": "web", "driver": "qemu-microvm", "created_at": WHEN,
           "started_at": WHEN, "image": {"ref": "iris", "digest": "", "kernel": "/k",
                                             "initrd": "/i"},
           "cpus": 1, "memory_mib": 128, "ports": [], "accel_requested": "auto",
           "network": "bridge", "accel": "tcg", "guest_ip": "10.88.0.2", "tap": "uf-abc123",
           "pid": 42, "pid_start_time": 7, "extra": {}}
    replica = Replica.from_json(old, tmp_path)
    assert QemuRecord.of(replica) == QemuRecord("tcg", "10.88.0.2", "uf-abc123")
    written = replica.to_json()
    assert "accel" not in written and written["extra"]["tap"] == "uf-abc123"
    assert Replica.from_json(written, tmp_path) == replica

    old_runc = {**old, "driver": "runc", "accel": None, "extra": {
        "container_id": "uf-abc123", "bundle": "/b", "network_mode": "private", "cgroup": "/uf",
        "args": ["/bin/server"], "shim_pid": 40, "shim_start_time": 6, "host_ip": "10.89.0.1"}}
    record = RuncRecord.of(Replica.from_json(old_runc, tmp_path))
    assert (record.container_ip, record.host_if, record.runc_root) == ("10.88.0.2", "uf-abc123", None)
    assert (record.shim_pid, record.args) == (40, ("/bin/server",))
