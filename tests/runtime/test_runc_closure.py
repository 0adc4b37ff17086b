"""The traced closure as a distroless container: the same server as the conventional image, minus Debian.

The closure tracer (``uniframe.build.closure``) finds exactly the files the
model server touches; written as an OCI image and run under runc it must serve
the same answer as the conventional image, and the test prints the numbers the
two are compared by.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from runtime_helpers import free_port

from uniframe.build import oci
from uniframe.build.closure.materialize import materialize
from uniframe.build.closure.trace import WarmupRequest, trace
from uniframe.build.debian import rootfs_stats
from uniframe.build.examples import write_iris
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.replica import ReplicaConfig, ReplicaState
from uniframe.runtime.runc.driver import RuncDriver, image_ref

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc containers need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (apt-get install runc)"),
]

IRIS_SETOSA = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}


def host_sys_path() -> list[str]:
    out = subprocess.run([sys.executable, "-c", "import json,sys; print(json.dumps(sys.path))"],
                         capture_output=True, text=True, check=True, cwd="/")
    return [p for p in json.loads(out.stdout) if p and p != "/"]


def test_closure_image_serves_iris_under_runc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIFRAME_STATE", str(tmp_path / "st"))
    model = write_iris(tmp_path / "model")
    port = free_port()
    (tmp_path / "home").mkdir()
    closure = trace(
        ["uniframe.serve", str(model), "--port", str(port), "--host", "127.0.0.1"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path / "home")},
        ready_url=f"http://127.0.0.1:{port}/v2/health/ready",
        warmup=[WarmupRequest("POST", "/v2/models/iris/infer", json.dumps(IRIS_SETOSA).encode(),
                              {"Content-Type": "application/json"})],
        cwd=tmp_path,
    )
    root = tmp_path / "root"
    materialize(closure, root)
    (root / "model").mkdir()
    shutil.copyfile(model, root / "model" / "iris.onnx")
    stats = rootfs_stats(root)
    oci.write_image_layout(root, tmp_path / "layout", entrypoint=[closure.interpreter, "-m", "uniframe.serve"],
                           cmd=["/model/iris.onnx", "--port", "8080"],
                           env={"PYTHONPATH": ":".join(host_sys_path()), "HOME": "/tmp"}, exposed_ports=[8080])

    driver = RuncDriver()
    host_port = free_port()
    replica = driver.create(ReplicaConfig(image=image_ref(str(tmp_path / "layout")), cpus=1, memory_mib=512,
                                          ports=(PortMapping(host_port, 8080),)))
    try:
        begin = time.monotonic()
        driver.start(replica.id)
        while True:
            try:
                answer = httpx.post(f"http://127.0.0.1:{host_port}/v2/models/iris/infer", json=IRIS_SETOSA,
                                    timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() - begin < 60, b"".join(driver.logs(replica.id)).decode()[-2000:]
                time.sleep(0.01)
        first_inference_s = time.monotonic() - begin
        assert answer.status_code == 200, answer.text
        assert {o["name"]: o for o in answer.json()["outputs"]}["label"]["data"] == [0]
        status = driver.stop(replica.id, timeout=10)
        assert status.state is ReplicaState.EXITED and status.exit_status == 0, status
    finally:
        driver.remove(replica.id, force=True)
    assert driver.leftovers(replica) == []
    print(f"\nclosure image: rootfs {stats.size_bytes / 1e6:.0f} MB, {stats.files} files, "
          f"{stats.executables} executables, {stats.setuid} setuid/setgid; "
          f"start to first inference {first_inference_s:.2f} s")
    assert stats.setuid == 0
