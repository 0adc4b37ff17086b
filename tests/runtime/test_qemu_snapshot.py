"""Snapshot templates end to end: real QEMU (TCG), the real iris unikernel, real inferences.

A snapshottable replica answers a warm-up inference, becomes a template and
keeps serving; clones restored from it answer the same inference; a config the
template is not valid for, a corrupt template and a removed one are refused
with nothing left behind. The figures the issue asks for (pause, state size,
restore to first inference, median of 5) are printed.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from runtime_helpers import free_port, uniframe

from uniframe.build.examples import write_iris
from uniframe.build.images import build_image, image_port
from uniframe.build.store import Image, ImageStore
from uniframe.errors import RuntimeDriverError
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.qemu.driver import QemuMicroVMDriver
from uniframe.runtime.qemu.microvm import QemuRecord
from uniframe.runtime.qemu.snapshot import normalise_argv
from uniframe.runtime.qemu.snapshot_io import open_connections
from uniframe.runtime.replica import ReplicaConfig, ReplicaState
from uniframe.runtime.snapshot import SnapshotMismatchError
from uniframe.runtime.verify import image_ref
from uniframe.spec import InferenceService, load_file

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SPEC = """\
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {name: iris}
spec:
  model: {uri: ./iris.onnx}
  resources: {cpus: 1, memory: 256Mi}
"""
BODY = json.dumps({"inputs": [{"name": "X", "shape": [3, 4], "datatype": "FP32", "data": [
    [5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]}]}).encode()


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory, kernel_path: Path) -> Image:
    """The iris service built as a unikernel (the cached kernel, a squashfs root)."""
    d = tmp_path_factory.mktemp("iris")
    write_iris(d)
    (d / "service.yaml").write_text(SPEC)
    (doc,) = load_file(d / "service.yaml")
    assert isinstance(doc.spec, InferenceService)
    return build_image(doc.spec, source_digest=doc.digest(), runtime="unikernel",
                       store=ImageStore(d / "images"))


def _config(image: Image, port: int, **changes: object) -> ReplicaConfig:
    config = ReplicaConfig(image=image_ref(image), ports=(PortMapping(port, image_port(image)),),
                           accel="tcg", memory_mib=256)
    return replace(config, **changes)  # type: ignore[arg-type]


def _infer(port: int, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v2/models/iris/infer", BODY, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _until_inference(port: int, within: float) -> bytes:
    deadline = time.monotonic() + within
    last = ""
    while time.monotonic() < deadline:
        try:
            status, body = _infer(port, timeout=5)
            if status == 200:
                return body
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.02)
    raise AssertionError(f"no inference answered on port {port} within {within} s ({last})")


def _outputs(body: bytes) -> object:
    return json.loads(body)["outputs"]


def test_a_template_serves_on_and_its_clones_answer_the_same(driver: QemuMicroVMDriver, iris: Image) -> None:
    port = free_port()
    source = driver.start(driver.create(_config(iris, port, snapshottable=True)).id)
    warm = _until_inference(port, 180)  # the warm-up inference the template carries
    ram_file = Path(str(QemuRecord.of(source).ram_file))
    assert ram_file.is_file() and ram_file.parent == Path("/dev/shm")
    assert not any("balloon" in word for word in source.argv)

    # An open connection cannot cross a restore: not while one is open.
    with socket.create_connection(("127.0.0.1", port)):
        deadline = time.monotonic() + 5
        while open_connections(source.pid or 0, {port}) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # until QEMU has accepted it
        with pytest.raises(RuntimeDriverError, match=r"1 TCP connection.*open.*idle"):
            driver.snapshot(source.id)
    assert driver.snapshots.list() == []  # the refused attempt left nothing

    snap = driver.snapshot(source.id)
    stored = driver.snapshots.get(snap.id)
    print(f"snapshot: pause {stored.stats['pause_ms']} ms (device state saved in "
          f"{stored.stats['save_ms']} ms), state file {stored.stats['state_bytes']} bytes, "
          f"RAM copied {stored.stats['ram_copied_bytes'] / 1e6:.1f} MB")
    assert stored.stats["state_bytes"] < 1 << 20  # devices only: RAM stays in the file
    assert stored.ram.stat().st_size == 256 << 20 and not stored.ram.stat().st_mode & 0o222
    assert (snap.source_replica, snap.image_digest) == (source.id, iris.digest)
    assert driver.inspect(source.id).state is ReplicaState.RUNNING
    assert _outputs(_infer(port)[1]) == _outputs(warm)  # the template's source serves on

    # Five clones, one at a time: each answers the warm-up's inference at once.
    took, clones = [], []
    for _ in range(5):
        clone_port = free_port()
        started = time.monotonic()
        clone = driver.restore(snap, _config(iris, clone_port))
        answer = _until_inference(clone_port, 30)
        took.append(time.monotonic() - started)
        clones.append((clone, clone_port))
        assert _outputs(answer) == _outputs(warm)
        assert QemuRecord.of(clone).restored_from == snap.id
        assert normalise_argv(clone.argv, replica_dir=clone.dir, image=clone.config.image) == \
            normalise_argv(source.argv, replica_dir=source.dir, image=source.config.image)
    print(f"restore to first inference, median of 5: {statistics.median(took) * 1000:.0f} ms "
          f"({', '.join(f'{t * 1000:.0f}' for t in took)})")
    assert statistics.median(took) < 5  # vs ~6-8 s to boot under TCG

    # All five run at once from one template, each with its own state.
    for clone, clone_port in clones:
        assert _infer(clone_port)[0] == 200, clone.name
    with pytest.raises(RuntimeDriverError, match="restored from snapshot"):
        driver.snapshot(clones[0][0].id)

    # A config the template was not made for is refused before anything starts.
    with pytest.raises(SnapshotMismatchError,
                       match=r"what differs: QEMU arguments \(snapshot has \['1'\], this machine \['2'\]\)"):
        driver.restore(snap, _config(iris, free_port(), cpus=2))
    assert len(driver.list()) == 6

    # rm: the files go, running clones keep their private mapping and serve on.
    removed = uniframe("snapshot", "rm", snap.id[:6])
    assert removed.returncode == 0, removed.stderr
    assert not stored.dir.exists()
    assert _infer(clones[-1][1])[0] == 200
    with pytest.raises(RuntimeDriverError, match=r"not in .*take a new one"):
        driver.restore(snap, _config(iris, free_port()))

    # The source's own RAM file goes with it; clones never delete the template's.
    driver.remove(source.id, force=True)
    assert not ram_file.exists()

    # A clone stops like any replica: its guest init reads the shutdown line and reports 0.
    clone, _ = clones[0]
    status = driver.stop(clone.id, timeout=30)
    assert (status.state, status.exit_status) == (ReplicaState.EXITED, 0), status


def test_a_failed_restore_leaves_nothing_and_says_so(driver: QemuMicroVMDriver, iris: Image) -> None:
    port = free_port()
    source = driver.start(driver.create(_config(iris, port, snapshottable=True)).id)
    _until_inference(port, 180)
    snap = driver.snapshot(source.id)
    driver.remove(source.id, force=True)
    state = driver.snapshots.get(snap.id).state
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a torn device state

    before = {r.id for r in driver.list()}
    with pytest.raises(RuntimeDriverError, match=rf"restoring snapshot {snap.id} failed \(QEMU exited: .*load of migration failed.*\); boot a replica instead"):
        driver.restore(snap, _config(iris, free_port()))
    assert {r.id for r in driver.list()} == before  # the half-made clone is gone
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit()
                and snap.id in _cmdline(p)]  # and no QEMU still maps the template


def test_only_a_snapshottable_replica_can_be_snapshotted(driver: QemuMicroVMDriver, iris: Image) -> None:
    port = free_port()
    replica = driver.start(driver.create(_config(iris, port)).id)
    assert any("free-page-reporting=on" in word for word in replica.argv)
    with pytest.raises(RuntimeDriverError, match=r"anonymous memory.*snapshottable"):
        driver.snapshot(replica.id)
    assert ProcessRef(replica.pid or 0, replica.pid_start_time or 0).alive()  # untouched


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def iris_vm(tmp_path_factory: pytest.TempPathFactory, kernel_path: Path) -> Image:
    """The iris service built as a full VM disk (Debian, the cached kernel booted directly)."""
    d = tmp_path_factory.mktemp("irisvm")
    write_iris(d)
    (d / "service.yaml").write_text(SPEC)
    (doc,) = load_file(d / "service.yaml")
    assert isinstance(doc.spec, InferenceService)
    return build_image(doc.spec, source_digest=doc.digest(), runtime="vm",
                       store=ImageStore(d / "images"))


@pytest.mark.root
def test_a_full_vm_template_and_its_clone(state_dir: Path, iris_vm: Image) -> None:
    """The q35 VM: the template also keeps the disk overlay; the clone's overlay reads from it."""
    from uniframe.runtime.qemu.vm.driver import OVERLAY, QemuVMDriver

    driver = QemuVMDriver()
    try:
        port = free_port()
        source = driver.start(driver.create(_config(iris_vm, port, memory_mib=512,
                                                    snapshottable=True)).id)
        warm = _until_inference(port, 400)
        snap = driver.snapshot(source.id)
        stored = driver.snapshots.get(snap.id)
        print(f"full VM snapshot: pause {stored.stats['pause_ms']} ms, state file "
              f"{stored.stats['state_bytes']} bytes, RAM copied {stored.stats['ram_copied_bytes'] / 1e6:.1f} MB")
        assert (stored.dir / OVERLAY).is_file()
        assert _outputs(_infer(port)[1]) == _outputs(warm)

        clone_port = free_port()
        started = time.monotonic()
        clone = driver.restore(snap, _config(iris_vm, clone_port, memory_mib=512))
        answer = _until_inference(clone_port, 60)
        print(f"full VM restore to first inference: {(time.monotonic() - started) * 1000:.0f} ms")
        assert _outputs(answer) == _outputs(warm)
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(clone.dir / OVERLAY)],
                                         capture_output=True, text=True, check=True).stdout)
        assert info["backing-filename"] == str(stored.dir / OVERLAY)
        with pytest.raises(SnapshotMismatchError, match="not valid for this config"):
            driver.restore(snap, _config(iris_vm, free_port(), memory_mib=1024))
        status = driver.stop(clone.id, timeout=90)
        assert status.state is ReplicaState.EXITED, status  # the clone powers off like any VM
    finally:
        for replica in driver.list():
            driver.remove(replica.id, force=True)
