"""The runtime bundle runc runs: ``rootfs/`` plus ``config.json`` (OCI runtime spec 1.0).

This is how the runc driver runs a container, not how an image is built, so
it lives with the driver: the image (an OCI layout, from :mod:`uniframe.build.oci`)
says what to run, and :class:`RuntimeOptions` add what the host decides per
replica (network namespace, cgroup, limits, bind mounts). The configuration is
deliberately narrow: one capability (binding low ports), no new privileges,
the kernel's sensitive ``/proc`` and ``/sys`` files masked or read-only, a
device list that allows nothing, and a fresh ``/tmp`` unless the image keeps
files there.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniframe.build.oci import DEFAULT_PATH, ImageConfig, load_layout
from uniframe.errors import BuildError, ImageError

MINIMAL_CAPABILITIES = ("CAP_NET_BIND_SERVICE",)
MASKED_PATHS = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class BindMount:
    source: Path
    destination: str
    readonly: bool = True


@dataclass(frozen=True)
class RuntimeOptions:
    """How one container of an image runs: isolation and limits, beside what the image says.

    ``netns`` is the path of a named network namespace to join (``ip netns
    add`` makes ``/run/netns/NAME``); ``None`` gives the container a new empty
    one (loopback only) and ``host_network`` shares the host's.
    """

    hostname: str = "uniframe"
    readonly_rootfs: bool = False
    netns: Path | None = None
    host_network: bool = False
    cgroups_path: str | None = None
    cpus: float | None = None
    memory_mib: int | None = None
    pids_limit: int | None = 4096
    args: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[BindMount, ...] = ()


@dataclass(frozen=True)
class Bundle:
    dir: Path
    image: ImageConfig
    manifest_digest: str = ""  # of the image it was unpacked from, if any

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"


def _user_ids(user: str, rootfs: Path) -> tuple[int, int]:
    """``uid[:gid]`` or ``name[:group]`` looked up in the image's own passwd and group files."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")

    def lookup(file: str, key: str, col: int) -> int | None:
        if key.isdigit():
            return int(key)
        with contextlib.suppress(OSError):
            for line in (rootfs / "etc" / file).read_text().splitlines():
                fields = line.split(":")
                if len(fields) > col and fields[0] == key:
                    return int(fields[col])
        return None

    uid = lookup("passwd", name, 2)
    if uid is None:
        raise ImageError(f"the image runs as user {name!r}, which is not in its /etc/passwd")
    if group:
        gid = lookup("group", group, 2)
        if gid is None:
            raise ImageError(f"the image runs as group {group!r}, which is not in its /etc/group")
    else:
        gid = lookup("passwd", name, 3) if not name.isdigit() else None
        gid = 0 if gid is None else gid
    return uid, gid


def runtime_config(image: ImageConfig, options: RuntimeOptions, rootfs: Path) -> dict[str, Any]:
    """runc's ``config.json`` (OCI runtime spec 1.0) for ``image`` under ``options``."""
    args = list(options.args if options.args is not None else image.args)
    if not args:
        raise ImageError("the image has neither Entrypoint nor Cmd: there is nothing to run "
                         "(give the command to run explicitly)")
    env = {"PATH": DEFAULT_PATH, **image.env, **options.env, "HOSTNAME": options.hostname}
    uid, gid = _user_ids(image.user, rootfs)
    caps = list(MINIMAL_CAPABILITIES)
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    # A fresh /tmp, unless the image keeps files there (a closure traced from an app
    # installed under /tmp): a tmpfs would hide them and the app would not start.
    tmp = rootfs / "tmp"
    if not (tmp.is_dir() and any(tmp.iterdir())):
        mounts.append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "mode=1777"]})
    for bind in options.mounts:
        mounts.append({"destination": bind.destination, "type": "bind", "source": str(bind.source),
                       "options": ["rbind", "nosuid", "nodev", "ro" if bind.readonly else "rw"]})
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if not options.host_network:
        net: dict[str, str] = {"type": "network"}
        if options.netns is not None:
            net["path"] = str(options.netns)
        namespaces.append(net)
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if options.cpus is not None:
        resources["cpu"] = {"quota": int(options.cpus * CPU_PERIOD_US), "period": CPU_PERIOD_US}
    if options.memory_mib is not None:
        resources["memory"] = {"limit": options.memory_mib << 20}
    if options.pids_limit is not None:
        resources["pids"] = {"limit": options.pids_limit}
    linux: dict[str, Any] = {
        "namespaces": namespaces, "resources": resources,
        "maskedPaths": list(MASKED_PATHS), "readonlyPaths": list(READONLY_PATHS),
    }
    if options.cgroups_path:
        linux["cgroupsPath"] = options.cgroups_path
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False, "user": {"uid": uid, "gid": gid}, "args": args,
            "env": [f"{k}={v}" for k, v in env.items()], "cwd": image.workdir or "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": options.readonly_rootfs},
        "hostname": options.hostname,
        "mounts": mounts,
        "linux": linux,
    }


def write_bundle_config(bundle: Bundle, options: RuntimeOptions) -> Path:
    """(Re)write ``config.json`` for ``options``; the rootfs stays as it is."""
    config = runtime_config(bundle.image, options, bundle.rootfs)
    tmp = bundle.config_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, bundle.config_path)
    return bundle.config_path


def bundle_from_layout(layout: Path, bundle_dir: Path, options: RuntimeOptions | None = None,
                       ref_name: str | None = None) -> Bundle:
    """A runc bundle (``rootfs/`` + ``config.json``) from an OCI layout directory or ``.tar``."""
    bundle_dir.mkdir(parents=True, exist_ok=True)
    read = load_layout(layout, bundle_dir / "rootfs", ref_name)
    bundle = Bundle(bundle_dir, read.config, read.manifest_digest)
    write_bundle_config(bundle, options or RuntimeOptions())
    return bundle


def bundle_from_root(root: Path, bundle_dir: Path, *, entrypoint: Sequence[str], cmd: Sequence[str] = (),
                     env: Mapping[str, str] | None = None, workdir: str = "/", user: str = "",
                     options: RuntimeOptions | None = None) -> Bundle:
    """A runc bundle from a root directory, copied as it is (no layer round trip)."""
    if not root.is_dir():
        raise BuildError(f"cannot make a bundle: {root} is not a directory")
    rootfs = bundle_dir / "rootfs"
    if rootfs.exists():
        raise BuildError(f"{rootfs} already exists; give a new bundle directory")
    bundle_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["cp", "-a", "--reflink=auto", str(root), str(rootfs)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"copying {root} into the bundle failed: {proc.stderr.strip()}")
    image = ImageConfig(entrypoint=tuple(entrypoint), cmd=tuple(cmd), env=dict(env or {}),
                        workdir=workdir, user=user)
    bundle = Bundle(bundle_dir, image)
    write_bundle_config(bundle, options or RuntimeOptions())
    return bundle
