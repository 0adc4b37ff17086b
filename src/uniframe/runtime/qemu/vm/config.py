"""What a full VM replica is asked to be, and how that fits the shared replica record.

:class:`~uniframe.runtime.replica.ReplicaConfig` describes a kernel and an
initrd; a full VM also has a disk, may boot that disk's own loader instead of a
kernel, and may carry cloud-init data. :class:`VMConfig` holds all of it. The
shared record keeps the common fields in its ``config`` and the VM's own in
``extra``, so ``ps``-style listings read every driver's replicas alike.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniframe.build.store import Image, load_image_dir
from uniframe.errors import RuntimeDriverError
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.replica import ImageRef, Replica, ReplicaConfig
from uniframe.spec.workload import Workload

MIB = 1 << 20


@dataclass(frozen=True)
class CloudInitData:
    """What goes on the NoCloud seed: ``user-data``, ``meta-data``, ``network-config``."""

    user_data: str
    meta_data: dict[str, Any] = field(default_factory=dict)
    network_config: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"user_data": self.user_data, "meta_data": self.meta_data,
                "network_config": self.network_config}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CloudInitData:
        return cls(str(data["user_data"]), dict(data.get("meta_data") or {}), data.get("network_config"))


@dataclass(frozen=True)
class VMConfig:
    """One full VM: a disk (never written), and a kernel to boot directly or none (firmware boot)."""

    disk: Path
    name: str | None = None
    cpus: int = 1
    memory_mib: int = 512
    ports: tuple[PortMapping, ...] = ()
    accel: str = "auto"
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    cloud_init: CloudInitData | None = None
    ref: str = ""
    digest: str = ""
    snapshottable: bool = False  # RAM in a shared file, so the replica can become a template

    @property
    def boot(self) -> str:
        """``kernel`` (QEMU loads our kernel and initrd) or ``firmware`` (the disk's loader)."""
        return "kernel" if self.kernel is not None else "firmware"

    @classmethod
    def from_image(cls, image: Image, **options: Any) -> VMConfig:
        """A VM from a ``kind: vm`` image of the store (disk, kernel, initrd, command line)."""
        if image.kind != "vm":
            raise RuntimeDriverError(
                f"image {image.names[0] if image.names else image.short} is a {image.kind} image; "
                "the vm runtime boots images built as VM disks (kind vm)"
            )
        ref = image.names[0] if image.names else image.digest
        return cls(disk=image.file("disk"), kernel=image.kernel, initrd=image.initrd,
                   cmdline=image.cmdline, ref=ref, digest=image.digest, **options)

    @classmethod
    def from_replica_config(cls, config: ReplicaConfig) -> VMConfig:
        """From the common config: its image's kernel sits in an image directory that names the disk."""
        image = load_image_dir(config.image.kernel.parent)
        return cls.from_image(image, name=config.name, cpus=config.cpus, memory_mib=config.memory_mib,
                              ports=config.ports, accel=config.accel, snapshottable=config.snapshottable)

    @classmethod
    def for_disk(cls, disk: Path, **options: Any) -> VMConfig:
        """A user's own disk, booted by its boot loader (cloud-init data optional)."""
        return cls(disk=disk, ref=str(disk), **options)

    @classmethod
    def from_workload(cls, workload: Workload, name: str | None = None) -> VMConfig:
        """A ``kind: Workload`` whose image is a VM disk (``image: ./disk.qcow2``, ``runtime: vm``).

        Resources round up to whole CPUs and MiB; a port without ``host`` gets
        a free host port now; the guest's hostname is the workload's name.
        """
        spec = workload.spec
        where = f"Workload {workload.metadata.name}"
        if spec.runtime != "vm" or spec.image_path is None or spec.image_source != "disk":
            raise RuntimeDriverError(f"{where}: the vm runtime runs a disk image (image: ./disk.qcow2 "
                                     f"with runtime: vm), not {spec.image!r} with runtime {spec.runtime}")
        ports = []
        for p in spec.ports:
            if p.protocol != "tcp":
                raise RuntimeDriverError(f"{where}: port {p.guest}/{p.protocol}: only tcp ports "
                                         "can be published from a VM")
            ports.append(PortMapping(p.host or _free_port(), p.guest))
        cloud_init = None
        if spec.cloud_init is not None:
            ci = spec.cloud_init
            user_data = ci.user_data if ci.user_data is not None else _read(ci.user_data_file, where)
            cloud_init = CloudInitData(user_data, {"local-hostname": workload.metadata.name})
        return cls.for_disk(spec.image_path, name=name or workload.metadata.name,
                            cpus=max(1, math.ceil(spec.resources.cpus)),
                            memory_mib=max(1, -(-spec.resources.memory // MIB)),
                            ports=tuple(ports), cloud_init=cloud_init)

    def replica_config(self) -> ReplicaConfig:
        """The common part, for the shared record (a firmware-booted disk has no kernel: ``.``)."""
        image = ImageRef(self.ref or str(self.disk), self.digest, self.kernel or Path(),
                         self.initrd or Path(), self.cmdline)
        return ReplicaConfig(image=image, name=self.name, cpus=self.cpus, memory_mib=self.memory_mib,
                             ports=self.ports, accel=self.accel, network="user",
                             snapshottable=self.snapshottable)

    def extra(self) -> dict[str, Any]:
        return {"disk": str(self.disk), "boot": self.boot,
                "cloud_init": self.cloud_init.to_json() if self.cloud_init else None}

    @classmethod
    def of_replica(cls, replica: Replica) -> VMConfig:
        c, extra = replica.config, replica.extra
        kernel_boot = extra.get("boot") == "kernel"
        ci = extra.get("cloud_init")
        return cls(disk=Path(extra["disk"]), name=replica.name, cpus=c.cpus, memory_mib=c.memory_mib,
                   ports=c.ports, accel=c.accel,
                   kernel=c.image.kernel if kernel_boot else None,
                   initrd=c.image.initrd if kernel_boot else None,
                   cmdline=c.image.cmdline, cloud_init=CloudInitData.from_json(ci) if ci else None,
                   ref=c.image.ref, digest=c.image.digest, snapshottable=c.snapshottable)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _read(path: Path | None, where: str) -> str:
    assert path is not None
    try:
        return path.read_text()
    except OSError as exc:
        raise RuntimeDriverError(f"{where}: cannot read cloudInit.userDataFile {path}: {exc.strerror}") from None
