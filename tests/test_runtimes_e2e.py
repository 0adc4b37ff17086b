"""One InferenceService, four runtimes: the same answers everywhere, and nothing left behind.

The spec is built for each runtime (unikernel, vm, container, process),
started through the common Driver interface, asked the same inference
through its published port, stopped and removed; then the host is searched
for anything the replica held: its process, mounts, network devices, network
namespaces, cgroups and state directory.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from uniframe.build.examples import write_iris
from uniframe.build.images import build_image, image_port
from uniframe.build.store import Image, ImageStore
from uniframe.runtime.driver import Driver
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.replica import ReplicaConfig, ReplicaState
from uniframe.runtime.verify import driver_for_image, free_port, image_ref
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
TIMEOUT = {"process": 30, "container": 60, "unikernel": 180, "vm": 400}

RUNTIMES = [
    pytest.param("process", marks=[]),
    pytest.param("container", marks=[pytest.mark.root]),
    pytest.param("unikernel", marks=[pytest.mark.qemu, pytest.mark.slow]),
    pytest.param("vm", marks=[pytest.mark.qemu, pytest.mark.slow, pytest.mark.root]),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("runtimes")
    write_iris(d)
    (d / "service.yaml").write_text(SPEC)
    return d


@pytest.fixture(scope="module")
def expected(workdir: Path) -> tuple[list[int], np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(workdir / "iris.onnx"))
    label, probs = sess.run(None, {"X": np.array(ROWS, dtype=np.float32)})
    return label.tolist(), probs


def _build(workdir: Path, runtime: str) -> Image:
    (doc,) = load_file(workdir / "service.yaml")
    assert isinstance(doc.spec, InferenceService)
    return build_image(doc.spec, source_digest=doc.digest(), runtime=runtime,  # type: ignore[arg-type]
                       store=ImageStore(workdir / "images"))


def _infer(port: int, deadline: float) -> dict[str, object]:
    last = ""
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", "/v2/models/iris/infer", BODY, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status == 200:
                result: dict[str, object] = json.loads(raw)
                return result
            last = f"{resp.status} {raw[:200]!r}"
        except (OSError, http.client.HTTPException) as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"no answer in time; last: {last}")


def _host_traces(replica_id: str) -> list[str]:
    """Everything on the host that still carries the replica's id."""
    short = replica_id[:10]
    found = []
    mounts = Path("/proc/self/mounts").read_text()
    found += [f"mount {line.split()[1]}" for line in mounts.splitlines() if short in line]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if short in line]
    netns = Path("/run/netns")
    if netns.is_dir():
        found += [f"netns {p.name}" for p in netns.iterdir() if short in p.name]
    for cg in Path("/sys/fs/cgroup").rglob(f"*{short}*"):
        found.append(f"cgroup {cg}")
    return found


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_same_answers_everywhere_and_nothing_left(
    runtime: str, workdir: Path, expected: tuple[list[int], np.ndarray], tmp_path: Path
) -> None:
    image = _build(workdir, runtime)
    driver: Driver = driver_for_image(image, root=tmp_path / "replicas")
    port = free_port()
    replica = driver.create(ReplicaConfig(image=image_ref(image), memory_mib=512,
                                          ports=(PortMapping(port, image_port(image)),)))
    try:
        replica = driver.start(replica.id)
        result = _infer(port, time.monotonic() + TIMEOUT[runtime])
        label, probs = result["outputs"]  # type: ignore[misc]
        assert label["data"] == expected[0]
        np.testing.assert_allclose(np.array(probs["data"]).reshape(3, 3), expected[1], rtol=1e-6)
        status = driver.stop(replica.id, timeout=60 if runtime == "vm" else 20)
        assert status.state is ReplicaState.EXITED, status
        if runtime != "vm":  # a VM's guest OS powers off: QEMU's own exit is the status
            assert status.exit_status == 0, status
        pid = driver.get(replica.id).pid
    finally:
        driver.remove(replica.id, force=True)
    assert pid is not None
    assert replica.pid_start_time is not None
    assert not ProcessRef(pid, replica.pid_start_time).alive()  # gone (a zombie counts as gone)
    assert not replica.dir.exists()
    assert _host_traces(replica.id) == []
