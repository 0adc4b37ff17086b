"""The pseudo filesystems a Python app expects, mounted by PID 1.

The kernel hands PID 1 a bare root (an initramfs, or a read-only disk with
devtmpfs already on ``/dev``): no ``/proc`` (so no
``/proc/cmdline``, ``os.cpu_count`` falls back, ``/proc/self`` is missing),
no ``/sys``, only the device nodes the archive carries, and no scratch
space apart from the root itself, if that is writable at all. Nothing else
will mount them.

Mounting is tolerant, because the same init also runs where someone already
did part of the work (a container runtime, a test in a PID namespace): a
target that is already a mount point is left alone, ``EBUSY`` counts as
already mounted, a filesystem the kernel was built without (``ENODEV``) is
reported and skipped, a missing mount point on a read-only root (``EROFS``)
is reported and skipped, and a scratch directory that already holds files is
not covered (the image shipped them; hiding them would lose data).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from uniframe.guest import libc
from uniframe.guest.libc import MS_NODEV, MS_NOEXEC, MS_NOSUID

MountFn = Callable[[str, str, str, int, str], None]  # (source, target, fstype, flags, data)


@dataclass(frozen=True)
class Mount:
    target: str
    fstype: str
    flags: int = MS_NOSUID | MS_NODEV
    data: str = ""
    cover_files: bool = False  # mount even if the directory holds files


# Order matters: /proc first (the configuration is read from /proc/cmdline),
# /dev before /dev/shm. /dev covers the archive's bootstrap nodes on purpose:
# devtmpfs has them all.
STANDARD_MOUNTS = (
    Mount("/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    Mount("/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    Mount("/dev", "devtmpfs", MS_NOSUID, "mode=0755", cover_files=True),
    Mount("/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    Mount("/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    Mount("/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
)

MOUNTED = "mounted"
ALREADY = "already mounted"
NOT_EMPTY = "skipped: directory not empty"
UNSUPPORTED = "skipped: filesystem not in this kernel"
NO_MOUNT_POINT = "skipped: no mount point, and the root is read-only"


@dataclass(frozen=True)
class MountResult:
    target: str
    fstype: str
    outcome: str


def mount_all(mounts: Iterable[Mount] = STANDARD_MOUNTS, *, root: str = "/",
              mount: MountFn = libc.mount) -> list[MountResult]:
    """Mount each filesystem under ``root`` unless it is there already.

    Returns what happened to each; raises ``OSError`` for a failure that is
    not one of the tolerated cases above.
    """
    results = []
    for m in mounts:
        target = os.path.join(root, m.target.lstrip("/"))
        results.append(MountResult(m.target, m.fstype, _mount_one(m, target, mount)))
    return results


def _mount_one(m: Mount, target: str, mount: MountFn) -> str:
    if os.path.ismount(target):
        return ALREADY
    if os.path.isdir(target):
        if not m.cover_files and os.listdir(target):
            return NOT_EMPTY
    else:
        try:
            os.makedirs(target, mode=0o755)
        except OSError as exc:
            if exc.errno == errno.EROFS:
                return NO_MOUNT_POINT
            raise
    try:
        mount(m.fstype, target, m.fstype, m.flags, m.data)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return ALREADY
        if exc.errno == errno.ENODEV:
            return UNSUPPORTED
        raise
    return MOUNTED
