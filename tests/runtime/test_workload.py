"""Workloads: a user's OCI archive under runc, a user's disk as a full VM with a NoCloud seed."""

from __future__ import annotations

import http.client
import json
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from uniframe.build.examples import write_iris
from uniframe.build.images import build_image
from uniframe.build.store import ImageStore
from uniframe.runtime.replica import ReplicaState
from uniframe.runtime.workload import create_workload, run_workload
from uniframe.spec import InferenceService, Workload, load_text

BODY = json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                               "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()


def _workload(text: str, base: Path) -> Workload:
    (doc,) = load_text(text, "workload.yaml", base_dir=base)
    assert isinstance(doc.spec, Workload)
    return doc.spec


@pytest.mark.root
@pytest.mark.slow
def test_oci_archive_workload_with_args_override(tmp_path: Path) -> None:
    write_iris(tmp_path)
    (tmp_path / "svc.yaml").write_text(
        "apiVersion: uniframe.dev/v1alpha1\nkind: InferenceService\nmetadata: {name: iris}\n"
        "spec: {model: {uri: ./iris.onnx}, runtime: container}\n")
    (doc,) = load_text((tmp_path / "svc.yaml").read_text(), "svc.yaml", base_dir=tmp_path)
    assert isinstance(doc.spec, InferenceService)
    image = build_image(doc.spec, source_digest=doc.digest(), store=ImageStore(tmp_path / "images"))
    archive = tmp_path / "iris-layout.tar"
    with tarfile.open(archive, "w") as tar:  # an OCI layout as another tool would hand it over
        for name in ("oci-layout", "index.json", "blobs"):
            tar.add(image.dir / name, arcname=name)
    workload = _workload(
        "apiVersion: uniframe.dev/v1alpha1\nkind: Workload\nmetadata: {name: flower}\n"
        "spec:\n  image: ./iris-layout.tar\n  runtime: container\n"
        "  resources: {cpus: 1, memory: 256Mi}\n  ports: [{guest: 9000}]\n"
        "  args: [/srv/models/iris/1/model.onnx, --name, flower, --port, '9000']\n", tmp_path)
    ((driver, replica),) = run_workload(workload, root=tmp_path / "replicas")
    try:
        port = replica.config.ports[0].host_port
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("POST", "/v2/models/flower/infer", BODY)
                resp = conn.getresponse()
                if resp.status == 200:
                    assert json.loads(resp.read())["outputs"][0]["data"] == [0]
                    break
            except (OSError, http.client.HTTPException):
                pass
            assert time.monotonic() < deadline, b"".join(driver.logs(replica.id)).decode()
            time.sleep(0.2)
        assert driver.stop(replica.id, timeout=10).state is ReplicaState.EXITED
    finally:
        driver.remove(replica.id, force=True)


@pytest.mark.qemu
def test_disk_workload_becomes_a_vm_with_overlay_and_seed(tmp_path: Path) -> None:
    disk = tmp_path / "user.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    workload = _workload(
        "apiVersion: uniframe.dev/v1alpha1\nkind: Workload\nmetadata: {name: legacy}\n"
        "spec:\n  image: ./user.qcow2\n  replicas: 2\n  resources: {cpus: 1, memory: 512Mi}\n"
        "  ports: [{guest: 22}]\n  cloudInit:\n    userData: |\n      #cloud-config\n"
        "      runcmd: [echo hello]\n", tmp_path)
    created = create_workload(workload, root=tmp_path / "replicas")
    try:
        assert [r.name for _d, r in created] == ["legacy-0", "legacy-1"]
        ports = {r.config.ports[0].host_port for _d, r in created}
        assert len(ports) == 2  # free host ports picked per replica
        for driver, replica in created:
            assert driver.kind == "qemu-vm"
            assert (replica.dir / "seed.iso").is_file()
            info = json.loads(subprocess.run(
                ["qemu-img", "info", "--output=json", str(replica.dir / "disk.qcow2")],
                capture_output=True, text=True, check=True).stdout)
            assert info["backing-filename"] == str(disk)  # a per-replica overlay on the user's disk
            assert driver.inspect(replica.id).state is ReplicaState.CREATED
        assert disk.stat().st_size < 1 << 20  # the user's disk is never written
    finally:
        for driver, replica in created:
            driver.remove(replica.id, force=True)


def test_fixed_host_port_with_several_replicas_is_refused(tmp_path: Path) -> None:
    from uniframe.errors import RuntimeDriverError

    workload = _workload(
        "apiVersion: uniframe.dev/v1alpha1\nkind: Workload\nmetadata: {name: web}\n"
        "spec:\n  image: ./layout\n  runtime: container\n  replicas: 2\n"
        "  ports: [{host: 8080, guest: 80}]\n", tmp_path)
    with pytest.raises(RuntimeDriverError, match="host port 8080 can be published by one replica only"):
        create_workload(workload, root=tmp_path / "replicas")
