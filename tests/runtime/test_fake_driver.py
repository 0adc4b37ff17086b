"""The fake driver's knobs and injections, and the snapshot record: what the conformance
suite does not already claim of every driver.

The control-plane tests lean on these (a replica that never gets ready, one that
dies by itself, one that ignores a graceful stop...), so each knob is shown to
do what it says, over the replica's real HTTP port where it shows there.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_helpers import free_port

from uniframe.errors import RuntimeDriverError
from uniframe.runtime import hostnet
from uniframe.runtime.fake import Behavior, FakeDriver
from uniframe.runtime.ports import PortInUseError, PortMapping
from uniframe.runtime.registry import REGISTRY
from uniframe.runtime.replica import ImageRef, Replica, ReplicaConfig, ReplicaState
from uniframe.runtime.snapshot import Snapshot, SnapshotMismatchError, validity_key

IMAGE = ImageRef("iris:1", "sha256:" + "1" * 64, Path(), Path(), kind="process")


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeDriver]:
    driver = FakeDriver(tmp_path / "replicas")
    yield driver
    for replica in driver.list():
        driver.remove(replica.id, force=True)


def _get(port: int, path: str, timeout: float = 2) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def _started(fake: FakeDriver, behavior: Behavior | None = None) -> tuple[Replica, int]:
    if behavior is not None:
        fake.behavior = behavior
    port = free_port()
    replica = fake.create(ReplicaConfig(image=IMAGE, ports=(PortMapping(port, 8080),)))
    return fake.start(replica.id), port


def test_readiness_follows_ready_delay_and_ready(fake: FakeDriver) -> None:
    _, port = _started(fake, Behavior(ready_delay=0.6))
    assert _get(port, "/v2/health/live") == 200
    assert _get(port, "/v2/health/ready") == 503
    time.sleep(0.7)
    assert _get(port, "/v2/health/ready") == 200
    _, never = _started(fake, Behavior(ready=False))
    assert _get(never, "/v2/models/iris/ready") == 503


def test_crash_after_ends_the_run_without_a_status_and_frees_the_port(fake: FakeDriver) -> None:
    replica, port = _started(fake, Behavior(crash_after=0.2))
    status = fake.wait(replica.id, timeout=5)
    assert status.state is ReplicaState.CRASHED and status.exit_status is None
    assert "crash_after" in status.detail
    with pytest.raises(OSError):
        _get(port, "/v2/health/ready", timeout=0.5)


def test_a_graceful_stop_ends_with_the_configured_status(fake: FakeDriver) -> None:
    replica, _ = _started(fake, Behavior(exit_status=3, stop_delay=0.2))
    began = time.monotonic()
    status = fake.stop(replica.id, timeout=5)
    assert (status.state, status.exit_status) == (ReplicaState.EXITED, 3)
    assert time.monotonic() - began >= 0.2


def test_an_ignored_stop_is_forced_at_the_timeout(fake: FakeDriver) -> None:
    replica, _ = _started(fake, Behavior(ignore_stop=True))
    began = time.monotonic()
    status = fake.stop(replica.id, timeout=0.3)
    assert time.monotonic() - began >= 0.3
    assert status.state is ReplicaState.CRASHED
    assert status.detail == "did not stop within 0.3 s; killed"


def test_a_hung_replica_answers_nothing_until_resumed(fake: FakeDriver) -> None:
    replica, port = _started(fake)
    fake.hang(replica.id)
    with pytest.raises(TimeoutError):
        _get(port, "/v2/health/ready", timeout=0.3)
    assert fake.inspect(replica.id).state is ReplicaState.RUNNING  # alive to the driver
    fake.resume(replica.id)
    assert _get(port, "/v2/health/ready") == 200


def test_a_failing_start_names_the_replica_and_the_cause(fake: FakeDriver) -> None:
    fake.behavior = Behavior(fail_start="no such binary")
    replica = fake.create(ReplicaConfig(image=IMAGE))
    with pytest.raises(RuntimeDriverError, match=f"{replica.name} did not start: no such binary"):
        fake.start(replica.id)
    assert fake.inspect(replica.id).state is ReplicaState.CREATED


def test_a_behavior_may_be_chosen_per_replica(fake: FakeDriver) -> None:
    fake.behavior = lambda r: Behavior(ready=r.name != "broken")
    good = fake.create(ReplicaConfig(image=IMAGE, name="good", ports=(PortMapping(free_port(), 1),)))
    bad = fake.create(ReplicaConfig(image=IMAGE, name="broken",
                                    ports=(PortMapping(free_port(), 1),)))
    for replica in (good, bad):
        fake.start(replica.id)
    assert _get(good.config.ports[0].host_port, "/v2/health/ready") == 200
    assert _get(bad.config.ports[0].host_port, "/v2/health/ready") == 503


def test_its_ports_are_claimed_on_the_host_network_while_it_runs(fake: FakeDriver) -> None:
    replica, port = _started(fake)
    with hostnet.locked(fake.root.parent) as net:
        holding = net.holding(replica.id)
    assert holding is not None and [p.host_port for p in holding.ports] == [port]
    other = fake.create(ReplicaConfig(image=IMAGE, ports=(PortMapping(port, 8080),)))
    with pytest.raises(PortInUseError, match=str(port)):
        fake.start(other.id)
    fake.crash(replica.id)
    fake.reap(replica.id)  # the end seen: the claim is given back
    with hostnet.locked(fake.root.parent) as net:
        assert net.holding(replica.id) is None
    fake.start(other.id)


def test_every_driver_over_the_same_root_sees_the_same_runs(fake: FakeDriver) -> None:
    """The reconciler asks the registry for a driver per call: they must agree."""
    replica, _ = _started(fake)
    again = REGISTRY.driver_for("fake", fake.root)
    assert again.inspect(replica.id).state is ReplicaState.RUNNING
    assert isinstance(again, FakeDriver)
    again.crash(replica.id)
    assert fake.inspect(replica.id).state is ReplicaState.CRASHED


def test_another_process_reads_a_running_fake_replica_as_crashed(fake: FakeDriver) -> None:
    """What simulated it is gone there, as a host process is after a reboot."""
    replica, _ = _started(fake)
    code = ("import sys; from pathlib import Path; from uniframe.runtime.fake import FakeDriver; "
            "s = FakeDriver(Path(sys.argv[1])).inspect(sys.argv[2]); print(s.state.value, s.detail)")
    out = subprocess.run([sys.executable, "-c", code, str(fake.root), replica.id],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("crashed the fake replica's process is gone")


def test_inference_answers_one_label_per_row_for_the_model_the_image_names(
        fake: FakeDriver, tmp_path: Path) -> None:
    _, port = _started(fake)  # an image with no manifest: any model name is served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    body = {"inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32", "data": [0.0] * 8}]}
    conn.request("POST", "/v2/models/whatever/infer", json.dumps(body))
    answer = json.loads(conn.getresponse().read())
    conn.close()
    assert (answer["model_name"], answer["model_version"]) == ("whatever", "fake")
    assert answer["outputs"][0]["data"] == [0, 0]


def test_validity_keys_ignore_argument_order_and_tell_none_apart() -> None:
    assert validity_key(a="x", b=1) == validity_key(b=1, a="x")
    assert validity_key(accel=None) != validity_key(accel="tcg")
    assert validity_key(cpus=1) != validity_key(cpus=2)


def test_a_snapshot_checks_the_driver_and_the_config_it_is_for() -> None:
    snap = Snapshot("s1", "qemu-microvm", "r1", "sha256:x", "now", "/snaps/s1", "k1", 10)
    assert Snapshot.from_json(snap.to_json()) == snap
    snap.check("qemu-microvm", "k1")
    with pytest.raises(SnapshotMismatchError, match="take a new snapshot with fake"):
        snap.check("fake", "k1")
    with pytest.raises(SnapshotMismatchError, match="not valid for this config"):
        snap.check("qemu-microvm", "k2")


def test_a_fake_snapshot_lives_in_the_memory_of_its_process(fake: FakeDriver) -> None:
    replica, _ = _started(fake)
    snap = fake.snapshot(replica.id)
    assert snap in fake.snapshots()
    fake.forget_snapshot(snap.id)
    with pytest.raises(RuntimeDriverError, match="not in this process's memory"):
        fake.restore(snap, replica.config)
