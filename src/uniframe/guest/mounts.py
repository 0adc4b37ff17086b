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
reported and skipped, and a missing mount point on a read-only root
(``EROFS``) is reported and skipped.

A directory that already holds files is not covered blindly: the image keeps
host paths, so an app built from a checkout or a virtual environment under
``/tmp`` on the build host (CI checks out into ``/tmp/ci``) ships its files
under ``/tmp``, and a tmpfs over them would hide the app. Left unmounted, as
this init once did, a read-only squashfs root gives the app no scratch space
at all. So the scratch tmpfs mounts (``keep_files``) go on anyway and put the
image's own entries back on top: each directory and file is bind-mounted from
an ``O_PATH`` descriptor opened before the tmpfs covered it (through
``/proc/self/fd``, mounted first), each symlink is made again. The shipped
files stay as read-only as the root they come from; everything else in the
directory is scratch space. Other mounts skip such a directory, as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from uniframe.guest import libc
from uniframe.guest.libc import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_REC

MountFn = Callable[[str, str, str, int, str], None]  # (source, target, fstype, flags, data)


@dataclass(frozen=True)
class Mount:
    target: str
    fstype: str
    flags: int = MS_NOSUID | MS_NODEV
    data: str = ""
    cover_files: bool = False  # mount even if the directory holds files, hiding them
    keep_files: bool = False  # mount even if it holds files, and bind them back in on top


# Order matters: /proc first (the configuration is read from /proc/cmdline),
# /dev before /dev/shm. /dev covers the archive's bootstrap nodes on purpose:
# devtmpfs has them all.
STANDARD_MOUNTS = (
    Mount("/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    Mount("/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    Mount("/dev", "devtmpfs", MS_NOSUID, "mode=0755", cover_files=True),
    Mount("/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", keep_files=True),
    Mount("/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", keep_files=True),
    Mount("/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", keep_files=True),
)
# Where a descriptor's file can be named again once a mount covers its path.
FD_DIR = "/proc/self/fd"

MOUNTED = "mounted"
KEPT = "mounted, with the image's own entries there bound back in"
ALREADY = "already mounted"
NOT_EMPTY = "skipped: directory not empty"
UNSUPPORTED = "skipped: filesystem not in this kernel"
NO_MOUNT_POINT = "skipped: no mount point, and the root is read-only"


@dataclass(frozen=True)
class MountResult:
    target: str
    fstype: str
    outcome: str
    kept: tuple[str, ...] = ()  # with KEPT: the names the image had there


def mount_all(mounts: Iterable[Mount] = STANDARD_MOUNTS, *, root: str = "/",
              mount: MountFn = libc.mount) -> list[MountResult]:
    """Mount each filesystem under ``root`` unless it is there already.

    Returns what happened to each; raises ``OSError`` for a failure that is
    not one of the tolerated cases above.
    """
    results = []
    for m in mounts:
        target = os.path.join(root, m.target.lstrip("/"))
        if os.path.ismount(target):
            results.append(MountResult(m.target, m.fstype, ALREADY))
        elif os.path.isdir(target) and not m.cover_files and (names := sorted(os.listdir(target))):
            if m.keep_files and os.path.isdir(FD_DIR):
                results.append(_mount_keeping(m, target, names, mount))
            else:
                results.append(MountResult(m.target, m.fstype, NOT_EMPTY))
        else:
            results.append(MountResult(m.target, m.fstype, _mount_one(m, target, mount)))
    return results


def _mount_one(m: Mount, target: str, mount: MountFn) -> str:
    if not os.path.isdir(target):
        try:
            os.makedirs(target, mode=0o755)
        except OSError as exc:
            if exc.errno == errno.EROFS:
                return NO_MOUNT_POINT
            raise
    return _mount_fs(m, target, mount)


def _mount_fs(m: Mount, target: str, mount: MountFn) -> str:
    try:
        mount(m.fstype, target, m.fstype, m.flags, m.data)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return ALREADY
        if exc.errno == errno.ENODEV:
            return UNSUPPORTED
        raise
    return MOUNTED


def _mount_keeping(m: Mount, target: str, names: list[str], mount: MountFn) -> MountResult:
    """Mount ``m`` over ``target`` and put the image's ``names`` back on top of it."""
    links: dict[str, str] = {}
    held: dict[str, tuple[int, bool]] = {}  # name -> (O_PATH descriptor, is a directory)
    try:
        for name in names:
            path = os.path.join(target, name)
            if os.path.islink(path):
                links[name] = os.readlink(path)
            else:
                fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
                held[name] = (fd, os.path.isdir(path))
        outcome = _mount_fs(m, target, mount)
        if outcome != MOUNTED:
            return MountResult(m.target, m.fstype, outcome)
        for name, (fd, is_dir) in held.items():
            path = os.path.join(target, name)
            _make_mount_point(path, is_dir)
            mount(f"{FD_DIR}/{fd}", path, "", MS_BIND | MS_REC, "")
        for name, link in links.items():
            path = os.path.join(target, name)
            if not os.path.lexists(path):  # the mount did cover the directory
                os.symlink(link, path)
        return MountResult(m.target, m.fstype, KEPT, tuple(names))
    finally:
        for fd, _is_dir in held.values():
            os.close(fd)


def _make_mount_point(path: str, is_dir: bool) -> None:
    """An empty directory or file in the new tmpfs for a bind mount to go on."""
    if is_dir:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o755)
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
