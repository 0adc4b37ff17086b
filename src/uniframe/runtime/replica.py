"""The records every driver shares: what to run, what runs, and how it is doing.

They are plain dataclasses that round-trip through JSON because the replica's
directory, not a process's memory, is the source of truth (see the package
docstring). Only what every driver has lives in these fields; what one driver
chose or made (a QEMU accelerator, a tap device, a container's address) lives
in ``Replica.extra``, read and written through a typed record that driver owns.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from uniframe.runtime.ports import PortMapping

# Top-level fields of replica.json written before the drivers kept them in ``extra``
# (under the same keys): the daemon re-adopts replicas an older version started.
LEGACY_DRIVER_FIELDS = ("accel", "guest_ip", "tap")


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ImageRef:
    """The parts of an image a driver boots, plus how the user named it.

    A unikernel's root is either ``initrd`` (an initramfs QEMU loads) or
    ``disk`` (a read-only root file system QEMU attaches as virtio-blk); the
    part an image does not have is an empty ``Path()`` (``initrd``) or None
    (``disk``), as kernel and initrd are for images that have neither.
    """

    ref: str
    digest: str
    kernel: Path
    initrd: Path
    cmdline: str = ""
    kind: str = "unikernel"  # the image's kind: unikernel, oci, vm, process
    path: Path | None = None  # the image directory (or OCI layout, or disk) drivers read from
    disk: Path | None = None  # a unikernel's read-only root disk

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "digest": self.digest, "kernel": str(self.kernel),
                "initrd": str(self.initrd), "cmdline": self.cmdline, "kind": self.kind,
                "path": str(self.path) if self.path is not None else None,
                "disk": str(self.disk) if self.disk is not None else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRef:
        path = data.get("path")
        disk = data.get("disk")  # absent in records written before disk roots
        return cls(str(data["ref"]), str(data["digest"]), Path(data["kernel"]),
                   Path(data["initrd"]), str(data.get("cmdline", "")),
                   str(data.get("kind", "unikernel")), Path(path) if path else None,
                   Path(disk) if disk else None)


@dataclass(frozen=True)
class ReplicaConfig:
    """What the caller asks for, whichever driver runs it; drivers fill in the rest.

    It is the request (``uniframe run``'s flags, a spec's fields), so it holds a
    request a driver may ignore: ``accel`` only QEMU reads, ``command`` and
    ``args`` only containers. What a driver *chose* (the accelerator the probe
    picked, addresses, devices) is the driver's, in ``Replica.extra``.
    """

    image: ImageRef
    name: str | None = None
    cpus: int = 1
    memory_mib: int = 256
    ports: tuple[PortMapping, ...] = ()
    accel: str = "auto"        # auto | kvm | tcg (QEMU)
    network: str = "user"      # user | bridge (QEMU); private | host | none (runc; user = private)
    env: tuple[tuple[str, str], ...] = ()
    # Containers only: override the image's entrypoint and/or cmd.
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] | None = None
    # Run so that the replica can be snapshotted (drivers with the snapshot capability: for
    # QEMU, guest RAM in a file and no free page reporting); others ignore it.
    snapshottable: bool = False


class ReplicaState(enum.StrEnum):
    CREATED = "created"   # on disk, never started
    RUNNING = "running"
    EXITED = "exited"     # the guest reported its exit status
    CRASHED = "crashed"   # the VM went away without a status (killed, QEMU died, guest panic)


@dataclass(frozen=True)
class ReplicaStatus:
    state: ReplicaState
    exit_status: int | None = None
    detail: str = ""
    finished_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "exit_status": self.exit_status,
                "detail": self.detail, "finished_at": self.finished_at}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReplicaStatus:
        return cls(ReplicaState(data["state"]), data.get("exit_status"),
                   str(data.get("detail", "")), data.get("finished_at"))


@dataclass(frozen=True)
class Replica:
    """One replica as recorded in ``replica.json``."""

    id: str
    name: str
    dir: Path
    config: ReplicaConfig
    created_at: str
    driver: str
    pid: int | None = None
    pid_start_time: int | None = None
    started_at: str | None = None
    log_offset: int = 0
    argv: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # the driver's own record (see above)

    def with_(self, **changes: Any) -> Replica:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "id": self.id, "name": self.name, "driver": self.driver,
            "created_at": self.created_at, "started_at": self.started_at,
            "image": c.image.to_json(), "cpus": c.cpus, "memory_mib": c.memory_mib,
            "ports": [p.to_json() for p in c.ports], "accel_requested": c.accel,
            "network": c.network, "command": list(c.command) if c.command is not None else None,
            "args": list(c.args) if c.args is not None else None, "env": [list(e) for e in c.env],
            "snapshottable": c.snapshottable,
            "pid": self.pid, "pid_start_time": self.pid_start_time,
            "log_offset": self.log_offset, "argv": list(self.argv), "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: Path) -> Replica:
        config = ReplicaConfig(
            image=ImageRef.from_json(data["image"]), name=data["name"],
            cpus=int(data["cpus"]), memory_mib=int(data["memory_mib"]),
            ports=tuple(PortMapping.from_json(p) for p in data.get("ports", [])),
            accel=str(data.get("accel_requested", "auto")), network=str(data.get("network", "user")),
            command=tuple(data["command"]) if data.get("command") is not None else None,
            args=tuple(data["args"]) if data.get("args") is not None else None,
            env=tuple((str(k), str(v)) for k, v in data.get("env", [])),
            snapshottable=bool(data.get("snapshottable", False)),
        )
        extra = dict(data.get("extra", {}))
        for key in LEGACY_DRIVER_FIELDS:  # records written before drivers kept these in extra
            if data.get(key) is not None:
                extra.setdefault(key, data[key])
        return cls(
            id=str(data["id"]), name=str(data["name"]), dir=directory, config=config,
            created_at=str(data["created_at"]), driver=str(data["driver"]),
            pid=data.get("pid"), pid_start_time=data.get("pid_start_time"),
            started_at=data.get("started_at"), log_offset=int(data.get("log_offset", 0)),
            argv=tuple(data.get("argv", [])), extra=extra,
        )
