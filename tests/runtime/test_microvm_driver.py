"""The microVM driver end to end: real QEMU (TCG), real kernel, real sockets, real CLI processes."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from runtime_helpers import GUEST_PORT, READY, free_port, image_ref, uniframe, wait_for

from uniframe.runtime.ports import PortInUseError, PortMapping
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.qemu.driver import CONSOLE_LOG, EXIT_FILE, REPLICA_FILE, QemuMicroVMDriver
from uniframe.runtime.replica import ReplicaConfig, ReplicaState

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def _config(image: Path, port: int, name: str | None = None) -> ReplicaConfig:
    return ReplicaConfig(image=image_ref(image), name=name, ports=(PortMapping(port, GUEST_PORT),),
                         accel="tcg", memory_mib=128)


def test_boot_serve_stop_and_rediscover(driver: QemuMicroVMDriver, test_image: Path) -> None:
    port = free_port()
    replica = driver.create(_config(test_image, port, name="web"))
    assert driver.inspect(replica.id).state is ReplicaState.CREATED

    started = time.monotonic()
    replica = driver.start(replica.id)
    boot = wait_for(replica.dir / CONSOLE_LOG, READY)
    print(f"QEMU start to guest marker under TCG: {time.monotonic() - started:.2f} s")

    reply = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
    assert reply.status_code == 200 and reply.text == "hello from the test guest\n"
    assert boot < 60

    # Everything needed to find it again is on disk.
    record = json.loads((replica.dir / REPLICA_FILE).read_text())
    assert record["pid"] == replica.pid and record["extra"]["accel"] == "tcg"
    assert ProcessRef(record["pid"], record["pid_start_time"]).alive()
    assert record["ports"] == [{"host_ip": "127.0.0.1", "host_port": port, "guest_port": GUEST_PORT, "protocol": "tcp"}]
    assert "-no-reboot" in record["argv"]

    # A fresh process (the CLI) rediscovers it from disk.
    ps = uniframe("ps", "-o", "json")
    assert ps.returncode == 0, ps.stderr
    [row] = json.loads(ps.stdout)
    assert (row["id"], row["name"], row["status"]["state"]) == (replica.id, "web", "running")
    table = uniframe("ps")
    assert replica.id in table.stdout and f"127.0.0.1:{port}->{GUEST_PORT}/tcp" in table.stdout

    # Graceful stop: the guest reads uniframe:shutdown from its console and reports status 0.
    stopped_at = time.monotonic()
    status = uniframe("stop", "web", "--timeout", "30")
    assert status.returncode == 0, status.stderr
    assert "exited (0)" in status.stdout
    assert time.monotonic() - stopped_at < 20
    assert "uniframe:shutdown" in (replica.dir / CONSOLE_LOG).read_text()

    assert json.loads((replica.dir / EXIT_FILE).read_text())["exit_status"] == 0
    fresh = QemuMicroVMDriver()
    final = fresh.inspect(replica.id)
    assert (final.state, final.exit_status) == (ReplicaState.EXITED, 0)
    assert not ProcessRef(record["pid"], record["pid_start_time"]).alive()
    assert uniframe("ps").stdout.count(replica.id) == 0
    assert "exited (0)" in uniframe("ps", "-a").stdout

    logs = uniframe("logs", replica.id[:6])
    assert "UNIFRAME-TEST-READY" in logs.stdout and "UNIFRAME-EXIT status=0" in logs.stdout

    removed = uniframe("rm", "web")
    assert removed.returncode == 0 and not replica.dir.exists()


def test_exit_status_and_restart(driver: QemuMicroVMDriver, test_image: Path) -> None:
    """The guest's own status is reported, and a restart reads only the new run's status."""
    port = free_port()
    replica = driver.start(driver.create(_config(test_image, port)).id)
    wait_for(replica.dir / CONSOLE_LOG, READY)
    httpx.get(f"http://127.0.0.1:{port}/exit/7", timeout=10)
    status = driver.wait(replica.id, timeout=30)
    assert (status.state, status.exit_status) == (ReplicaState.EXITED, 7)

    replica = driver.start(replica.id)
    assert replica.log_offset > 0
    assert driver.inspect(replica.id).state is ReplicaState.RUNNING
    log = replica.dir / CONSOLE_LOG
    deadline = time.monotonic() + 90
    while log.read_bytes()[replica.log_offset:].count(READY) == 0:
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)
    status = driver.stop(replica.id, timeout=30)
    assert (status.state, status.exit_status) == (ReplicaState.EXITED, 0)


def test_stop_escalates_to_qmp_quit(driver: QemuMicroVMDriver, stubborn_image: Path) -> None:
    replica = driver.start(driver.create(_config(stubborn_image, free_port())).id)
    wait_for(replica.dir / CONSOLE_LOG, READY)
    started = time.monotonic()
    status = driver.stop(replica.id, timeout=1.0)
    assert status.state is ReplicaState.CRASHED
    assert "stopped with QMP quit" in status.detail
    assert time.monotonic() - started < 6
    assert not ProcessRef(replica.pid or 0, replica.pid_start_time or 0).alive()


def test_port_taken_is_named_before_launch(driver: QemuMicroVMDriver, test_image: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        replica = driver.create(_config(test_image, port))
        with pytest.raises(PortInUseError, match=f"127.0.0.1:{port} is already in use"):
            driver.start(replica.id)
        assert driver.get(replica.id).pid is None  # QEMU was never launched

        result = uniframe("run", str(test_image), "-p", f"{port}:{GUEST_PORT}", "-d", "--accel", "tcg")
        assert result.returncode == 2
        assert f"127.0.0.1:{port} is already in use" in result.stderr
        assert "Traceback" not in result.stderr
    assert len(driver.list()) == 1  # the CLI cleaned up its failed replica


def test_running_replica_is_not_removed_without_force(driver: QemuMicroVMDriver, test_image: Path) -> None:
    replica = driver.start(driver.create(_config(test_image, free_port())).id)
    result = uniframe("rm", replica.id)
    assert result.returncode == 2 and "is running" in result.stderr
    assert uniframe("rm", "-f", replica.id).returncode == 0
    assert not replica.dir.exists()
    assert replica.pid is not None and replica.pid_start_time is not None
    assert not ProcessRef(replica.pid, replica.pid_start_time).alive()
