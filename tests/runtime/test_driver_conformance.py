"""The driver conformance suite: one set of claims that every driver, real or fake, passes.

The control plane trusts any driver the same way (start means launched,
``inspect`` tells running from exited from crashed, ``stop`` ends gracefully
with the workload's status, ``remove`` leaves nothing behind), so those claims
are tested once, here, against each driver: process, runc, QEMU microVM, QEMU
VM and the in-memory fake. The fake passing the same suite is what lets the
control-plane tests use it instead of real processes.

Each driver runs the same iris model server image built for its runtime (the
fake runs the process image: it reads only the model name from it). A VM
boots once per claim that needs a guest answering; the crash claim kills QEMU
right after it starts, so the whole suite boots each VM once.

Every real driver must answer exactly as ONNX Runtime does in this process
(labels equal, probabilities to 1e-6): one spec, the same answers whatever runs
it. The fake answers a fixed shape only.

After every remove the host is searched for anything carrying the replica's
id (process, mount, network link, network namespace, cgroup, its directory)
and its published port must be free again.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from runtime_helpers import free_port, host_traces

from uniframe.build.examples import write_iris
from uniframe.build.images import build_image, image_port
from uniframe.build.store import Image, ImageStore
from uniframe.errors import RuntimeDriverError
from uniframe.runtime.driver import Driver, ReplicaNotFoundError
from uniframe.runtime.fake import FakeDriver
from uniframe.runtime.hostnet.session import hostnet_dir
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.process import ProcessRef, group_members
from uniframe.runtime.registry import REGISTRY, Capability
from uniframe.runtime.replica import Replica, ReplicaConfig, ReplicaState, ReplicaStatus
from uniframe.runtime.snapshot import Snapshot, SnapshotMismatchError
from uniframe.runtime.verify import image_ref
from uniframe.spec import InferenceService, load_file

SPEC = """\
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {name: iris}
spec:
  model: {uri: ./iris.onnx}
  resources: {cpus: 1, memory: 512Mi}
"""
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
BODY = json.dumps({"inputs": [{"name": "X", "shape": [3, 4], "datatype": "FP32",
                               "data": ROWS}]}).encode()


def _kill_process(driver: Driver, replica: Replica) -> None:
    assert replica.pid is not None
    os.kill(replica.pid, signal.SIGKILL)


def _kill_group(driver: Driver, replica: Replica) -> None:
    """The process runtime's server runs under a shim in its own session: kill them all."""
    assert replica.pid is not None
    os.killpg(replica.pid, signal.SIGKILL)


def _kill_fake(driver: Driver, replica: Replica) -> None:
    assert isinstance(driver, FakeDriver)
    driver.crash(replica.id)


@dataclass(frozen=True)
class Subject:
    """One driver under test and what differs in testing it."""

    kind: str
    runtime: str           # the spec runtime whose image it runs
    kill9: Callable[[Driver, Replica], None]
    ready_within: float    # seconds from start to an answered inference
    stop_within: float     # the graceful stop's timeout
    real_model: bool = True  # serves the model itself (the fake answers a fixed shape)


SUBJECTS = [
    pytest.param(Subject("fake", "process", _kill_fake, 10, 5, real_model=False), id="fake"),
    pytest.param(Subject("process", "process", _kill_group, 30, 20), id="process"),
    pytest.param(Subject("runc", "container", _kill_process, 60, 20), id="runc",
                 marks=[pytest.mark.root]),
    pytest.param(Subject("qemu-microvm", "unikernel", _kill_process, 180, 30), id="qemu-microvm",
                 marks=[pytest.mark.qemu, pytest.mark.slow]),
    pytest.param(Subject("qemu-vm", "vm", _kill_process, 400, 90), id="qemu-vm",
                 marks=[pytest.mark.qemu, pytest.mark.slow, pytest.mark.root]),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("conformance")
    write_iris(d)
    (d / "service.yaml").write_text(SPEC)
    return d


@pytest.fixture(scope="module")
def expected(workdir: Path) -> tuple[list[int], list[list[float]]]:
    """The labels and probabilities ONNX Runtime gives for ``ROWS`` in this process."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(workdir / "iris.onnx"), providers=["CPUExecutionProvider"])
    label, probs = session.run(None, {"X": np.array(ROWS, dtype=np.float32)})
    return label.tolist(), probs.tolist()


@pytest.fixture(scope="module")
def images(workdir: Path) -> Callable[[str], Image]:
    """The iris image for a runtime, built once per module run (a VM disk takes minutes)."""
    built: dict[str, Image] = {}

    def get(runtime: str) -> Image:
        if runtime not in built:
            (doc,) = load_file(workdir / "service.yaml")
            assert isinstance(doc.spec, InferenceService)
            built[runtime] = build_image(doc.spec, source_digest=doc.digest(),
                                         runtime=runtime,  # type: ignore[arg-type]
                                         store=ImageStore(workdir / "images"))
        return built[runtime]

    return get


@dataclass
class Bench:
    """A driver, its image and the replicas a test made (removed afterwards, whatever happens)."""

    subject: Subject
    driver: Driver
    image: Image
    made: list[str]

    @property
    def capabilities(self) -> frozenset[Capability]:
        return REGISTRY.entry(self.subject.kind).capabilities

    def config(self, port: int, **changes: object) -> ReplicaConfig:
        config = ReplicaConfig(image=image_ref(self.image), memory_mib=512,
                               ports=(PortMapping(port, image_port(self.image)),))
        return replace(config, **changes)  # type: ignore[arg-type]

    def create(self, port: int, **changes: object) -> Replica:
        replica = self.driver.create(self.config(port, **changes))
        self.made.append(replica.id)
        return replica


@pytest.fixture(params=SUBJECTS)
def bench(request: pytest.FixtureRequest, images: Callable[[str], Image],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    subject: Subject = request.param
    # short: unix socket paths in the replica directory must stay under 108 bytes
    root = tmp_path_factory.mktemp("r")
    driver = REGISTRY.driver_for(subject.kind, root)  # made as the product makes it
    b = Bench(subject, driver, images(subject.runtime), [])
    yield b
    for replica_id in b.made:
        try:
            replica = driver.get(replica_id)
        except ReplicaNotFoundError:
            continue
        tail = b"".join(driver.logs(replica_id))[-3000:].decode(errors="replace")
        print(f"--- log of {replica.name} ---\n{tail}")
        driver.remove(replica_id, force=True)


def _request(port: int, method: str, path: str, body: bytes | None = None,
             timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _until_answers(port: int, within: float) -> dict[str, object]:
    """Ready by both OIP readiness routes, then one inference answered."""
    deadline = time.monotonic() + within
    last = ""
    while time.monotonic() < deadline:
        try:
            ready = [_request(port, "GET", p)[0] for p in ("/v2/health/ready",
                                                           "/v2/models/iris/ready")]
            if ready == [200, 200]:
                status, raw = _request(port, "POST", "/v2/models/iris/infer", BODY)
                assert status == 200, raw[:300]
                answer: dict[str, object] = json.loads(raw)
                return answer
            last = f"readiness {ready}"
        except (OSError, http.client.HTTPException) as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"no inference answered within {within} s; last: {last}")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _nothing_left(driver: Driver, replica: Replica, port: int) -> None:
    """Gone from the driver and from the host: process, mounts, links, netns, cgroup, files
    (its directory, its host network record), port."""
    with pytest.raises(ReplicaNotFoundError):
        driver.get(replica.id)
    assert not replica.dir.exists()
    assert list(hostnet_dir(driver.root.parent).rglob(f"*{replica.id}*")) == []
    if replica.pid is not None and replica.pid_start_time is not None:
        assert not ProcessRef(replica.pid, replica.pid_start_time).alive()
        assert group_members(replica.pid) == []
    assert host_traces(replica.id) == []
    deadline = time.monotonic() + 5
    while not _port_free(port):
        assert time.monotonic() < deadline, f"port {port} is still taken after remove"
        time.sleep(0.1)


def test_create_start_infer_log_stop_and_remove_without_a_trace(
        bench: Bench, expected: tuple[list[int], list[list[float]]]) -> None:
    driver, port = bench.driver, free_port()
    replica = bench.create(port)
    assert driver.inspect(replica.id).state is ReplicaState.CREATED
    assert driver.get(replica.name).id == replica.id  # by name as well as by id

    started = driver.start(replica.id)
    assert started.started_at is not None
    assert driver.inspect(replica.id).state is ReplicaState.RUNNING
    answer = _until_answers(port, bench.subject.ready_within)
    label = answer["outputs"][0]  # type: ignore[index]
    assert label["shape"] == [3]  # one answer per row sent
    if bench.subject.real_model:  # the same answers whatever runs the spec
        import numpy as np

        labels, probs = answer["outputs"]  # type: ignore[misc]
        assert labels["data"] == expected[0]
        np.testing.assert_allclose(np.array(probs["data"]).reshape(3, 3), expected[1], rtol=1e-6)
    with pytest.raises(RuntimeDriverError, match="already running"):
        driver.start(replica.id)
    with pytest.raises(RuntimeDriverError, match="running"):
        driver.remove(replica.id)  # not without force

    log = b"".join(driver.logs(replica.id))
    assert log, "a running replica that answered has written nothing to its log"
    tail = b"".join(driver.logs(replica.id, offset=max(0, len(log) - 10)))
    assert tail.startswith(log[-10:])  # the offset is honoured

    status = driver.stop(replica.id, timeout=bench.subject.stop_within)
    assert status.state is ReplicaState.EXITED, status
    if Capability.EXIT_STATUS in bench.capabilities:
        assert status.exit_status == 0, status
    assert driver.inspect(replica.id) == status  # recorded once, read the same afterwards
    assert driver.wait(replica.id, timeout=1) == status
    assert driver.stop(replica.id) == status  # stopping a stopped replica changes nothing

    final = driver.get(replica.id)
    driver.remove(replica.id)
    _nothing_left(driver, final, port)


def test_kill_9_reads_as_crashed_and_remove_leaves_nothing(bench: Bench) -> None:
    driver, port = bench.driver, free_port()
    replica = driver.start(bench.create(port).id)
    bench.subject.kill9(driver, replica)
    status = _ended(driver, replica.id)
    # Killed is never a clean exit: crashed, or (a container runtime reporting the workload's
    # own status) exited with 128 + SIGKILL.
    assert (status.state is ReplicaState.CRASHED
            or (status.state is ReplicaState.EXITED and status.exit_status == 128 + 9)), status
    assert status.state is not ReplicaState.CRASHED or status.exit_status is None
    assert driver.inspect(replica.id) == status
    final = driver.get(replica.id)
    driver.remove(replica.id)
    _nothing_left(driver, final, port)


def _ended(driver: Driver, replica_id: str, within: float = 15) -> ReplicaStatus:
    status = driver.wait(replica_id, timeout=within)
    assert status.state is not ReplicaState.RUNNING, f"still running {within} s after kill -9"
    return status


def test_an_unknown_replica_is_named_with_the_known_ones(bench: Bench) -> None:
    with pytest.raises(ReplicaNotFoundError, match=r"no .*'no-such-replica'.*ps -a"):
        bench.driver.get("no-such-replica")


def test_snapshot_and_restore_or_a_refusal_naming_the_driver(bench: Bench) -> None:
    """Drivers with the snapshot capability restore a replica that answers (and carries
    its state); the others refuse at once, naming themselves, before touching anything."""
    driver = bench.driver
    if Capability.SNAPSHOT not in bench.capabilities:
        with pytest.raises(RuntimeDriverError, match=f"the {bench.subject.kind} driver cannot snapshot"):
            driver.snapshot("any")
        foreign = Snapshot("s1", "elsewhere", "r1", "sha256:x", "now", "/nowhere", "k")
        with pytest.raises(RuntimeDriverError, match=f"the {bench.subject.kind} driver cannot restore"):
            driver.restore(foreign, bench.config(free_port()))
        return
    port = free_port()
    source = driver.start(bench.create(port, snapshottable=True).id)
    _until_answers(port, bench.subject.ready_within)
    snap = driver.snapshot(source.id)
    assert (snap.driver, snap.source_replica, snap.image_digest) == (
        bench.subject.kind, source.id, bench.image.digest)
    assert Snapshot.from_json(json.loads(json.dumps(snap.to_json()))) == snap
    driver.stop(source.id, timeout=bench.subject.stop_within)

    with pytest.raises(SnapshotMismatchError, match="not valid for this config"):
        driver.restore(snap, bench.config(free_port(), memory_mib=1024))
    other = replace(snap, driver="another-driver")
    with pytest.raises(SnapshotMismatchError, match="only it can restore it"):
        driver.restore(other, bench.config(free_port()))

    port2 = free_port()
    restored = driver.restore(snap, bench.config(port2))
    bench.made.append(restored.id)
    assert restored.id != source.id
    assert driver.inspect(restored.id).state is ReplicaState.RUNNING
    answer = _until_answers(port2, bench.subject.ready_within)
    assert "outputs" in answer
    if isinstance(driver, FakeDriver):  # the fake's state: requests served, counted on
        assert driver.served(restored.id) == 2
