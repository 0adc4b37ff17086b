"""The few system calls PID 1 needs that the ``os`` module lacks, through ctypes.

``mount(2)``, ``reboot(2)`` and ``prctl(2)`` have no Python wrapper, and the
guest ships no compiler and no helper binaries, so they are called from libc
with ctypes. libc is reached with ``dlopen(NULL)`` (the interpreter's own
global symbols) rather than ``find_library("c")``, which needs ``ldconfig`` or
a compiler and finds nothing in an initramfs.

ctypes is imported at module level on purpose: the image builder traces what
``import uniframe.guest.init`` loads as an ordinary process, and an import
hidden inside a PID-1-only function would be missing from the image. The
image therefore needs ``ctypes/``, the ``_ctypes`` extension module and the
libffi it links.
"""

from __future__ import annotations

import ctypes
import functools
import os

# <sys/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
# <sys/reboot.h>: restart the machine; with reboot=t and QEMU's -no-reboot, QEMU exits.
RB_AUTOBOOT = 0x01234567
# <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36


@functools.cache
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                          ctypes.c_ulong, ctypes.c_char_p]
    lib.mount.restype = ctypes.c_int
    lib.reboot.argtypes = [ctypes.c_int]
    lib.reboot.restype = ctypes.c_int
    lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                          ctypes.c_ulong, ctypes.c_ulong]
    lib.prctl.restype = ctypes.c_int
    return lib


def _check(result: int, what: str, path: str | None = None) -> None:
    if result != 0:
        err = ctypes.get_errno()
        if path is None:
            raise OSError(err, f"{what}: {os.strerror(err)}")
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """``mount(2)``; raises ``OSError`` with the errno (EBUSY: already mounted)."""
    result = _libc().mount(source.encode(), target.encode(), fstype.encode(), flags,
                           data.encode() if data else None)
    _check(result, f"mount {fstype} on {target}", target)


def reboot(cmd: int = RB_AUTOBOOT) -> None:
    """``reboot(2)``: returns only on failure, which raises ``OSError``."""
    _check(_libc().reboot(cmd), "reboot")


def set_child_subreaper() -> None:
    """Adopt orphaned descendants like PID 1 does, so the reaper works outside a VM too."""
    _check(_libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
