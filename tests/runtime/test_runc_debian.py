"""The conventional image (Debian + pip) serving the iris model under runc, end to end.

This is the baseline uniframe's unikernels are compared with, so the test also
prints what the comparison needs: the image's size, files, executables and
setuid files, and the time from ``start`` to the first answered inference.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from runtime_helpers import free_port

from uniframe.build import debian, oci
from uniframe.build.examples import write_iris
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.replica import ReplicaConfig, ReplicaState
from uniframe.runtime.runc.driver import RuncDriver, image_ref

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap and runc need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (apt-get install runc)"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="apt-get install debootstrap"),
]

IRIS_SETOSA = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}


def test_conventional_image_serves_iris_under_runc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIFRAME_STATE", str(tmp_path / "st"))
    model = write_iris(tmp_path / "model")
    started = time.monotonic()
    digest = debian.conventional_python_image(tmp_path / "layout", model)
    build_s = time.monotonic() - started
    layout = oci.read_layout(tmp_path / "layout")
    assert layout.manifest_digest == digest
    assert layout.config.args == ("/opt/venv/bin/python3", "-m", "uniframe.serve", "/model/iris.onnx",
                                  "--port", "8080")

    driver = RuncDriver()
    port = free_port()
    replica = driver.create(ReplicaConfig(image=image_ref(str(tmp_path / "layout")), name="conventional",
                                          cpus=1, memory_mib=512, ports=(PortMapping(port, 8080),)))
    try:
        stats = debian.rootfs_stats(replica.dir / "bundle" / "rootfs")
        begin = time.monotonic()
        driver.start(replica.id)
        url = f"http://127.0.0.1:{port}/v2/models/iris/infer"
        while True:
            try:
                answer = httpx.post(url, json=IRIS_SETOSA, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() - begin < 60, b"".join(driver.logs(replica.id)).decode()[-2000:]
                time.sleep(0.01)
        first_inference_s = time.monotonic() - begin
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o for o in answer.json()["outputs"]}
        assert outputs["label"]["data"] == [0]
        assert driver.cgroup_limits(replica.id).memory_bytes == 512 << 20
        status = driver.stop(replica.id, timeout=10)
        assert status.state is ReplicaState.EXITED and status.exit_status == 0, status
        assert "uniframe-serve: stopped" in b"".join(driver.logs(replica.id)).decode()
    finally:
        driver.remove(replica.id, force=True)
    assert driver.leftovers(replica) == []
    info = debian.rootfs_info(debian.debootstrap_rootfs(include=debian.PYTHON_PACKAGES))
    print(f"\nconventional image: debootstrap {info.get('debootstrap_seconds')} s, layout written in "
          f"{build_s:.1f} s, rootfs {stats.size_bytes / 1e6:.0f} MB, {stats.files} files, "
          f"{stats.executables} executables, {stats.setuid} setuid/setgid; layer "
          f"{layout.layers[0].size / 1e6:.0f} MB gzip; start to first inference {first_inference_s:.2f} s")
    assert stats.setuid > 0 and stats.executables > 100  # what a full distribution carries along
