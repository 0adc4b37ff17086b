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
from uniframe.runtime.driver import Driver
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.registry import driver_for_runtime
from uniframe.runtime.replica import ImageRef, Replica, ReplicaConfig
from uniframe.runtime.verify import free_port, image_ref
from uniframe.spec import Workload, image_source


def _ports(workload: Workload, replicas: int) -> list[tuple[PortMapping, ...]]:
    fixed = [p for p in workload.spec.ports if p.host is not None]
    if fixed and replicas > 1:
        raise RuntimeDriverError(
            f"{workload.metadata.name}: spec.ports: host port {fixed[0].host} can be published by "
            f"one replica only, and replicas is {replicas}; omit host to pick free ports")
    return [workload_ports(workload) for _ in range(replicas)]


def _memory_mib(workload: Workload) -> int:
    return max(1, int(workload.spec.resources.memory) >> 20)


def workload_ports(workload: Workload) -> tuple[PortMapping, ...]:
    """One replica's published ports: the fixed host ports, or free ones picked now."""
    return tuple(PortMapping(p.host or free_port(), p.guest, "127.0.0.1", p.protocol)
                 for p in workload.spec.ports)


def create_replica(workload: Workload, driver: Driver, name: str | None,
                   ports: tuple[PortMapping, ...]) -> Replica:
    """Create (not start) one replica of ``workload`` under ``driver`` (its runtime's)."""
    spec = workload.spec
    source = image_source(str(spec.image))
    if spec.runtime == "vm" and source == "disk":
        from dataclasses import replace

        from uniframe.runtime.qemu.vm.config import VMConfig
        from uniframe.runtime.qemu.vm.driver import QemuVMDriver

        assert isinstance(driver, QemuVMDriver)
        vm = replace(VMConfig.from_workload(workload, name=name), ports=ports)
        return driver.create(vm)
    if source in ("oci-layout", "oci-archive"):
        ref = ImageRef(str(spec.image), "", Path(), Path(), kind="oci", path=Path(spec.image))
    else:
        ref = image_ref(ImageStore().resolve(str(spec.image)))
    config = ReplicaConfig(
        image=ref, name=name, cpus=max(1, round(spec.resources.cpus)),
        memory_mib=_memory_mib(workload), ports=ports,
        command=tuple(spec.command) if spec.command else None,
        args=tuple(spec.args) if spec.args else None, env=tuple(sorted(spec.env.items())))
    return driver.create(config)


def create_workload(workload: Workload, *, root: Path | None = None) -> list[tuple[Driver, Replica]]:
    """Create (not start) the workload's replicas; return them with their drivers."""
    replicas = workload.spec.replicas
    driver = driver_for_runtime(workload.spec.runtime, root)
    out: list[tuple[Driver, Replica]] = []
    for i, ports in enumerate(_ports(workload, replicas)):
        name = workload.metadata.name if replicas == 1 else f"{workload.metadata.name}-{i}"
        out.append((driver, create_replica(workload, driver, name, ports)))
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
