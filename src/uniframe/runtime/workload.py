"""Run a ``Workload`` spec: existing images (OCI layouts and archives, VM disks) beside ours.

A Workload names its image by reference (see :func:`uniframe.spec.image_source`):
an OCI layout directory or ``.tar`` runs under runc, a raw or qcow2 disk boots
as a full VM (with a NoCloud seed when ``cloudInit`` is given, so cloud-init
in the guest configures it), and a store image runs under the driver of its
kind. Each replica goes through the common :class:`~uniframe.runtime.driver.Driver`.
"""

from __future__ import annotations

from pathlib import Path

from uniframe.build.store import ImageStore
from uniframe.errors import RuntimeDriverError
from uniframe.runtime.driver import Driver, driver_for_runtime
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.replica import ImageRef, Replica, ReplicaConfig
from uniframe.runtime.verify import free_port, image_ref
from uniframe.spec import Workload, image_source


def _ports(workload: Workload, replicas: int) -> list[tuple[PortMapping, ...]]:
    fixed = [p for p in workload.spec.ports if p.host is not None]
    if fixed and replicas > 1:
        raise RuntimeDriverError(
            f"{workload.metadata.name}: spec.ports: host port {fixed[0].host} can be published by "
            f"one replica only, and replicas is {replicas}; omit host to pick free ports")
    return [tuple(PortMapping(p.host or free_port(), p.guest, "127.0.0.1", p.protocol)
                  for p in workload.spec.ports) for _ in range(replicas)]


def _memory_mib(workload: Workload) -> int:
    return max(1, int(workload.spec.resources.memory) >> 20)


def create_workload(workload: Workload, *, root: Path | None = None) -> list[tuple[Driver, Replica]]:
    """Create (not start) the workload's replicas; return them with their drivers."""
    spec = workload.spec
    replicas = spec.replicas if spec.replicas is not None else 1
    source = image_source(str(spec.image))
    runtime = spec.runtime
    driver = driver_for_runtime(runtime, root)
    cpus = max(1, round(spec.resources.cpus))
    env = tuple(sorted(spec.env.items()))
    out: list[tuple[Driver, Replica]] = []
    for i, ports in enumerate(_ports(workload, replicas)):
        name = workload.metadata.name if replicas == 1 else f"{workload.metadata.name}-{i}"
        if runtime == "vm" and source == "disk":
            from dataclasses import replace

            from uniframe.runtime.vm.config import VMConfig
            from uniframe.runtime.vm.driver import QemuVMDriver

            assert isinstance(driver, QemuVMDriver)
            vm = replace(VMConfig.from_workload(workload, name=name), ports=ports)
            out.append((driver, driver.create(vm)))
            continue
        if source in ("oci-layout", "oci-archive"):
            ref = ImageRef(str(spec.image), "", Path(), Path(), kind="oci", path=Path(spec.image))
        else:
            ref = image_ref(ImageStore().resolve(str(spec.image)))
        config = ReplicaConfig(
            image=ref, name=name, cpus=cpus, memory_mib=_memory_mib(workload), ports=ports,
            command=tuple(spec.command) if spec.command else None,
            args=tuple(spec.args) if spec.args else None, env=env)
        out.append((driver, driver.create(config)))
    return out


def run_workload(workload: Workload, *, root: Path | None = None) -> list[tuple[Driver, Replica]]:
    """Create and start every replica of ``workload``; a failure removes what it created."""
    created = create_workload(workload, root=root)
    started: list[tuple[Driver, Replica]] = []
    try:
        for driver, replica in created:
            started.append((driver, driver.start(replica.id)))
    except BaseException:
        for driver, replica in created:
            driver.remove(replica.id, force=True)
        raise
    return started
