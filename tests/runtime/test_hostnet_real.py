"""One host port, two drivers, real processes: a container's published port is refused to a process replica.

A container publishes its port with nftables DNAT, which binds no socket, so
a process replica asking for the same port would bind it happily and the two
would fight over it (the kernel's DNAT wins on 127.0.0.1). The host network
book (:mod:`uniframe.runtime.hostnet`) refuses the second replica, naming the
first; once the container is removed the port is free for the process, and
then the container is refused in turn.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from runtime_helpers import free_port
from test_runc import SERVER_C, make_layout

from uniframe.build.examples import write_iris
from uniframe.build.images import build_image, image_port
from uniframe.build.store import ImageStore
from uniframe.runtime import hostnet
from uniframe.runtime.driver import Driver
from uniframe.runtime.local import ProcessDriver
from uniframe.runtime.ports import PortInUseError, PortMapping
from uniframe.runtime.qemu.initramfs import compile_static
from uniframe.runtime.replica import ReplicaConfig, ReplicaState
from uniframe.runtime.runc.driver import RuncDriver
from uniframe.runtime.runc.driver import image_ref as oci_ref
from uniframe.runtime.verify import image_ref
from uniframe.spec import InferenceService, load_file

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc containers need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (apt-get install runc)"),
]

SPEC = """\
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {name: iris}
spec:
  model: {uri: ./iris.onnx}
"""


@pytest.fixture
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("st")
    yield root
    for driver in (RuncDriver(root / "replicas"), ProcessDriver(root / "replicas")):
        for replica in driver.list():
            driver.remove(replica.id, force=True)


def wait_http(port: int, path: str = "/", timeout: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_port_one_driver_publishes_is_refused_to_another(state: Path, tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "oci", compile_static(SERVER_C))
    write_iris(tmp_path / "svc")
    (tmp_path / "svc" / "service.yaml").write_text(SPEC)
    (doc,) = load_file(tmp_path / "svc" / "service.yaml")
    assert isinstance(doc.spec, InferenceService)
    image = build_image(doc.spec, source_digest=doc.digest(), runtime="process",
                        store=ImageStore(tmp_path / "images"))
    runc: Driver = RuncDriver(state / "replicas")
    process: Driver = ProcessDriver(state / "replicas")
    port = free_port()

    container = runc.create(ReplicaConfig(image=oci_ref(str(layout)), name="web",
                                          ports=(PortMapping(port, 8080),)))
    runc.start(container.id)
    assert wait_http(port).text == "hello pid=1 host=web\n"
    server = process.create(ReplicaConfig(image=image_ref(image), name="iris",
                                          ports=(PortMapping(port, image_port(image), "0.0.0.0"),)))
    with pytest.raises(PortInUseError, match=f"already published by replica {container.id} \\(web, runc\\)"):
        process.start(server.id)
    assert process.inspect(server.id).state is ReplicaState.CREATED
    assert wait_http(port).text == "hello pid=1 host=web\n"  # the container keeps its port

    runc.remove(container.id, force=True)  # gives the port back
    process.start(server.id)
    assert wait_http(port, "/v2/health/ready").status_code == 200

    second = runc.create(ReplicaConfig(image=oci_ref(str(layout)), ports=(PortMapping(port, 8080),)))
    with pytest.raises(PortInUseError, match=str(port)):  # the server listens: bind sees it too
        runc.start(second.id)
    assert runc.inspect(second.id).state is ReplicaState.CREATED

    process.remove(server.id, force=True)
    runc.remove(second.id)
    with hostnet.locked(state) as net:
        assert net.holdings() == []  # every claim went back with its replica
