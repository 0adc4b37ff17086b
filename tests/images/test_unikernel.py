"""The iris service as a unikernel, end to end: build, manifest, reproducibility, boot, infer, crash.

The default image boots from a read-only squashfs root disk; the initramfs
format is built and booted too, and one squashfs image boots twice at once.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import os
import re
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from uniframe.build import rootfs
from uniframe.build.examples import write_iris
from uniframe.build.store import Image, ImageStore
from uniframe.build.unikernel import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_SQUASHFS_COMPRESSION,
    BuildResult,
    build_unikernel,
)
from uniframe.guest.net import hosts_text
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.qemu.driver import QMP_SOCK, QemuMicroVMDriver
from uniframe.runtime.qemu.qmp import Qmp
from uniframe.runtime.replica import ImageRef, ReplicaConfig, ReplicaState
from uniframe.runtime.verify import free_port, image_ref
from uniframe.spec import InferenceService, load_file

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SPEC = """\
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {name: iris}
spec:
  model: {uri: ./iris.onnx}
  runtime: unikernel
  resources: {cpus: 1, memory: 256Mi}
  env: {OMP_NUM_THREADS: "1"}
"""
IRIS = {"inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32",
                    "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]}]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("svc")
    write_iris(d)
    (d / "service.yaml").write_text(SPEC)
    return d


@pytest.fixture(scope="module")
def store(workdir: Path) -> ImageStore:
    return ImageStore(workdir / "images")


def _build(workdir: Path, store: ImageStore, **options: Any) -> BuildResult:
    (doc,) = load_file(workdir / "service.yaml")
    assert isinstance(doc.spec, InferenceService)
    return build_unikernel(doc.spec, source_digest=doc.digest(), store=store, **options)


@pytest.fixture(scope="module")
def built(workdir: Path, store: ImageStore) -> BuildResult:
    return _build(workdir, store)


@pytest.fixture
def driver(workdir: Path) -> Iterator[QemuMicroVMDriver]:
    d = QemuMicroVMDriver(root=workdir / "replicas")
    yield d
    for r in d.list():  # never leave a VM behind, whatever the test did
        d.remove(r.id, force=True)


def test_manifest_describes_the_image(built: BuildResult) -> None:
    m = built.image.manifest
    assert m["kind"] == "unikernel" and m["name"] == "iris"
    assert built.image.names == ("iris:latest",)
    assert m["model"]["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    assert m["kernel"]["config_hash"] == built.kernel.config_hash
    assert m["source_spec_digest"].startswith("sha256:")
    # the only program is the interpreter: no shell, no tools
    assert m["executables"] == [os.path.realpath(built.closure.interpreter)]
    packages = {p["package"] for p in m["packages"]}
    assert {"numpy", "onnxruntime", "python-stdlib", "uniframe", "system"} <= packages
    assert m["file_count"] > 100
    assert "uniframe.app=uniframe.serve" in m["cmdline"] and "reboot=t" in m["cmdline"]
    # the root is a read-only squashfs disk, mounted by the kernel, running /init
    assert set(m["files"]) == {"kernel", "root"}
    for role in ("kernel", "root"):
        assert built.image.file(role).stat().st_size == m["files"][role]["size"]
    assert m["root"] == {"format": "squashfs", "compression": DEFAULT_SQUASHFS_COMPRESSION,
                         "level": rootfs.DEFAULT_LEVELS[DEFAULT_SQUASHFS_COMPRESSION],
                         "block_size": DEFAULT_BLOCK_SIZE, "bytes": m["files"]["root"]["size"],
                         "uncompressed_bytes": m["root"]["uncompressed_bytes"]}
    assert m["root"]["uncompressed_bytes"] > 3 * m["root"]["bytes"]
    assert "initrd" not in m
    assert "root=/dev/vda ro rootfstype=squashfs init=/init" in m["cmdline"]
    assert "rootfstype=ramfs" not in m["cmdline"]
    # what the init cannot create on a read-only root is in the image
    listing = subprocess.run(["unsquashfs", "-lls", "-d", "", str(built.image.file("root"))],
                             capture_output=True, text=True, check=True).stdout
    for path in ("/init", "/etc/hosts", "/proc", "/sys", "/dev", "/tmp", "/run", "/dev/console",
                 m["model"]["path"]):
        assert re.search(rf" {re.escape(path)}$", listing, re.M), path
    hosts = subprocess.run(["unsquashfs", "-cat", str(built.image.file("root")), "/etc/hosts"],
                           capture_output=True, text=True, check=True).stdout
    assert hosts == hosts_text("iris")


def test_same_inputs_give_the_same_digest(built: BuildResult, workdir: Path, store: ImageStore) -> None:
    again = _build(workdir, store)
    assert again.image.digest == built.image.digest
    assert again.image.manifest["files"]["root"]["sha256"] == built.image.manifest["files"]["root"]["sha256"]
    assert len(store.list()) == 1


def _post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v2/models/iris/infer", body, headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _boot(driver: QemuMicroVMDriver, ref: ImageRef, timeout: float = 120) -> tuple[str, int]:
    port = free_port()
    replica = driver.create(ReplicaConfig(image=ref, memory_mib=256, ports=(PortMapping(port, 8080),)))
    driver.start(replica.id)
    _wait_ready(driver, replica.id, port, timeout)
    return replica.id, port


def _wait_ready(driver: QemuMicroVMDriver, rid: str, port: int, timeout: float = 120) -> None:
    """Until the server answers ready, or the replica stops running (the caller checks why)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.inspect(rid).state is not ReplicaState.RUNNING:
            return
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    raise AssertionError("the unikernel did not become ready:\n" + _console(driver, rid))


def _console(driver: QemuMicroVMDriver, replica_id: str) -> str:
    return b"".join(driver.logs(replica_id)).decode("utf-8", "replace")


def _infer_json(port: int) -> None:
    status, _h, raw = _post(port, json.dumps(IRIS).encode(), {"Content-Type": "application/json"})
    assert status == 200, raw
    out = json.loads(raw)["outputs"]
    assert out[0] == {"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 2]}


def test_boot_infer_json_and_binary_then_stop(built: BuildResult, driver: QemuMicroVMDriver) -> None:
    ref = image_ref(built.image)
    assert ref.disk == built.image.file("root") and ref.initrd == Path()
    rid, port = _boot(driver, ref)
    argv = driver.get(rid).argv
    assert "-initrd" not in argv
    assert f"if=none,id=root,file={ref.disk},format=raw,readonly=on" in argv
    _infer_json(port)

    x = struct.pack("<8f", *IRIS["inputs"][0]["data"])  # type: ignore[index]
    head = json.dumps({"inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(x)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    status, headers, raw = _post(port, head + x, {"Inference-Header-Content-Length": str(len(head))})
    assert status == 200, raw
    hlen = int(headers["inference-header-content-length"])
    meta = json.loads(raw[:hlen])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 16
    assert struct.unpack("<2q", raw[hlen : hlen + 16]) == (0, 2)

    # the guest's kernel took up free page reporting, so QEMU gets freed pages back
    assert "VIRTIO_BALLOON_F_REPORTING" in _guest_features(driver, rid, "virtio-balloon")

    final = driver.stop(rid, timeout=20)
    assert final.state is ReplicaState.EXITED and final.exit_status == 0
    log = _console(driver, rid)
    assert "UNIFRAME-EXIT status=0" in log
    assert "uniframe-serve: stopped" in log  # the server drained on the guest's SIGTERM
    # nothing on the boot path tried to write to the read-only root, nothing was skipped
    assert "Read-only file system" not in log and "warning" not in log.lower(), log
    assert "skipped" not in log, log


def test_two_replicas_boot_from_one_root_disk_at_once(built: BuildResult,
                                                      driver: QemuMicroVMDriver) -> None:
    # QEMU opens a readonly=on drive with a shared lock only, so neither refuses the file
    ref = image_ref(built.image)
    ports = {}
    for _ in range(2):
        port = free_port()
        replica = driver.create(ReplicaConfig(image=ref, memory_mib=256,
                                              ports=(PortMapping(port, 8080),)))
        driver.start(replica.id)
        ports[replica.id] = port
    for rid, port in ports.items():
        _wait_ready(driver, rid, port)
        _infer_json(port)
    for rid in ports:
        assert driver.stop(rid, timeout=20).exit_status == 0, _console(driver, rid)


@pytest.fixture(scope="module")
def built_initramfs(workdir: Path, store: ImageStore) -> BuildResult:
    return _build(workdir, store, rootfs_format="initramfs")


def test_the_initramfs_format_still_builds_and_boots(built_initramfs: BuildResult,
                                                     driver: QemuMicroVMDriver) -> None:
    m = built_initramfs.image.manifest
    assert set(m["files"]) == {"kernel", "initrd"}
    assert m["root"]["format"] == "initramfs" and m["root"]["compression"] == "lz4"
    assert "block_size" not in m["root"]
    assert m["initrd"] == {"compression": "lz4", "uncompressed_bytes": m["root"]["uncompressed_bytes"]}
    assert "rootfstype=ramfs" in m["cmdline"] and "root=/dev/vda" not in m["cmdline"]
    ref = image_ref(built_initramfs.image)
    assert ref.disk is None and ref.initrd == built_initramfs.image.file("initrd")
    rid, port = _boot(driver, ref)
    assert "-drive" not in driver.get(rid).argv
    _infer_json(port)
    final = driver.stop(rid, timeout=20)
    assert final.state is ReplicaState.EXITED and final.exit_status == 0


def _guest_features(driver: QemuMicroVMDriver, rid: str, device: str) -> set[str]:
    """The feature bits the guest's driver acknowledged for a virtio device, asked over QMP."""
    qmp = Qmp(driver.get(rid).dir / QMP_SOCK)
    devices: Any = qmp.execute("x-query-virtio")
    (path,) = [d["path"] for d in devices if d["name"] == device]
    status: Any = qmp.execute("x-query-virtio-status", {"path": path})
    return {f.split(":")[0] for f in status["guest-features"]["dev-features"]}


def _with_args(image: Image, **keys: str) -> ImageRef:
    """The image booted with some ``uniframe.*`` keys replaced on its command line."""
    words = [w for w in image.cmdline.split() if w.split("=", 1)[0] not in {f"uniframe.{k}" for k in keys}]
    words += [f"uniframe.{k}={v}" for k, v in keys.items()]
    return dataclasses.replace(image_ref(image), cmdline=" ".join(words))


def _wait_end(driver: QemuMicroVMDriver, rid: str, timeout: float = 90) -> ReplicaState:
    status = driver.wait(rid, timeout=timeout)
    return status.state


def test_app_exit_status_reaches_the_host(built: BuildResult, driver: QemuMicroVMDriver) -> None:
    args = base64.urlsafe_b64encode(json.dumps(["/srv/models/none.onnx"]).encode()).decode().rstrip("=")
    rid, _port = _boot(driver, _with_args(built.image, args=args))
    assert _wait_end(driver, rid) is ReplicaState.EXITED
    status = driver.inspect(rid)
    assert status.exit_status == 2
    log = _console(driver, rid)
    assert "/srv/models/none.onnx: no such model file" in log
    assert "UNIFRAME-EXIT status=2" in log


def test_app_crash_is_reported_and_the_vm_exits(built: BuildResult, driver: QemuMicroVMDriver) -> None:
    rid, _port = _boot(driver, _with_args(built.image, app="uniframe.serve.missing"))
    state = _wait_end(driver, rid)
    assert state in (ReplicaState.EXITED, ReplicaState.CRASHED)
    log = _console(driver, rid)
    assert "app crashed" in log and "uniframe.serve.missing" in log
    assert "UNIFRAME-EXIT status=1" in log
    assert driver.inspect(rid).exit_status == 1
