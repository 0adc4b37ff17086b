"""One host port, two replicas, real processes: whoever publishes it first keeps it.

A container publishes its port with nftables DNAT, which binds no socket, so
a process replica asking for the same port would bind it happily and the two
would fight over it (the kernel's DNAT wins on 127.0.0.1). The host network
book (:mod:`uniframe.runtime.hostnet`) refuses the second replica, naming the
first; once the container is removed the port is free for the process, and
then the container is refused in turn. A process replica run without ``-p``
still listens on its image's port, so it claims that one.
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
from uniframe.build.store import Image, ImageStore
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

needs_runc = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc containers need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (apt-get install runc)"),
]

SPEC = """\
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {{name: iris}}
spec:
  model: {{uri: ./iris.onnx}}
  port: {port}
"""


@pytest.fixture(scope="module")
def process_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The iris service as a process image whose server listens on a port free when it was built."""
    d = tmp_path_factory.mktemp("svc")
    write_iris(d)
    (d / "service.yaml").write_text(SPEC.format(port=free_port()))
    (doc,) = load_file(d / "service.yaml")
    assert isinstance(doc.spec, InferenceService)
    return build_image(doc.spec, source_digest=doc.digest(), runtime="process",
                       store=ImageStore(d / "images"))


@pytest.fixture
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("st")
    yield root
    drivers: list[Driver] = [ProcessDriver(root / "replicas")]
    if os.geteuid() == 0 and shutil.which("runc"):
        drivers.append(RuncDriver(root / "replicas"))
    for driver in drivers:
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


@pytest.mark.parametrize("runtime", [pytest.param("container", marks=needs_runc)])
def test_a_port_one_driver_publishes_is_refused_to_another(runtime: str, state: Path, tmp_path: Path,
                                                          process_image: Image) -> None:
    image = process_image
    layout = make_layout(tmp_path / "oci", compile_static(SERVER_C))
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
    with hostnet.locked(state) as net:  # the host's records: only this test's replicas matter
        assert [h for h in net.holdings() if h.owner.dir.is_relative_to(state)] == []


def test_a_process_replica_claims_the_port_it_listens_on_unpublished(state: Path, process_image: Image) -> None:
    """Without -p a process replica still takes the image's port on 127.0.0.1: a second is refused."""
    process = ProcessDriver(state / "replicas")
    port = image_port(process_image)
    first = process.create(ReplicaConfig(image=image_ref(process_image), name="first"))
    process.start(first.id)
    assert wait_http(port, "/v2/health/ready").status_code == 200
    second = process.create(ReplicaConfig(image=image_ref(process_image), name="second"))
    with pytest.raises(PortInUseError, match=f"127.0.0.1:{port}/tcp is already published by replica {first.id} "
                                             "\\(first, process\\)"):
        process.start(second.id)
    status = process.stop(first.id, timeout=10)
    assert (status.state, status.exit_status) == (ReplicaState.EXITED, 0)
    process.start(second.id)  # stopping gave the port back
    assert wait_http(port, "/v2/health/ready").status_code == 200
