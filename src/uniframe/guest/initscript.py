"""The ``/init`` script: the one file that ties the kernel to the guest init.

The kernel executes ``/init`` as PID 1: the initramfs's own, or, for an image
whose root is a read-only squashfs disk, the one ``init=/init`` names on the
kernel command line. A ``#!`` script lets
that PID 1 be the image's own Python, so the app later runs in that very
process. The image builder calls :func:`render_init_script` with the
interpreter and the ``sys.path`` it traced the app with.

Interpreter flags, ``-IBS``:

- ``-I`` (isolated): PYTHON* variables are ignored (the kernel turns unknown
  ``key=value`` boot parameters into init's environment, and none of them
  should steer the interpreter), no user site, and neither the current
  directory nor the script's directory (``/``) is put on ``sys.path``.
- ``-B``: never write ``__pycache__`` into the root (RAM-backed, or
  read-only). The builder
  should ship ``.pyc`` files compiled as unchecked-hash pycs: the archive's
  fixed mtimes would otherwise invalidate timestamp pycs and Python would
  recompile every module at every boot.
- ``-S``: no ``site``. The path is set explicitly below instead, so boot does
  not depend on ``site.py``, ``.pth`` files or the prefix layout, and skips
  their cost. Whatever ``.pth`` files added at trace time is already in the
  traced ``sys.path`` the builder passes here.

The kernel passes everything after the interpreter as *one* argument, so the
flags must be a single word (``-IBS``, not ``-I -B -S``), and the whole ``#!``
line must fit the kernel's 256-byte ``BINPRM_BUF_SIZE``.

Python's start-up does not wait for entropy (3.11 seeds its hash with a
non-blocking ``getrandom`` and falls back to ``/dev/urandom``; see
:mod:`uniframe.guest.entropy`), but that fallback needs ``/dev/urandom`` to
exist before devtmpfs is mounted: the
initramfs must carry ``dev/console`` (5:1), ``dev/null`` (1:3) and
``dev/urandom`` (1:9) as device nodes (see :data:`DEVICE_NODES`). On a disk
root the kernel itself mounts devtmpfs on ``/dev`` before ``/init`` runs
(``CONFIG_DEVTMPFS_MOUNT``), which needs only the empty directory; the image
carries the same nodes anyway, so both formats hold the same files.

A read-only root cannot get a directory created at boot, so every mount point
the init uses must be in the image (:data:`MOUNT_POINTS`), and so must
``/etc/hosts`` (:func:`uniframe.guest.net.hosts_text`).
"""

from __future__ import annotations

from collections.abc import Sequence

INIT_PATH = "/init"
INIT_MODE = 0o755
PYTHON_FLAGS = "-IBS"
_BINPRM_BUF_SIZE = 256

# Nodes the initramfs must contain: the kernel opens /dev/console for PID 1's
# stdin/stdout/stderr before any userspace runs, and Python may read
# /dev/urandom and open /dev/null before the init mounts devtmpfs.
# (path, "c", major, minor, mode)
DEVICE_NODES = (
    ("/dev/console", "c", 5, 1, 0o600),
    ("/dev/null", "c", 1, 3, 0o666),
    ("/dev/urandom", "c", 1, 9, 0o666),
)

# Empty directories the init mounts on (it creates missing ones, but a
# read-only root would not let it).
MOUNT_POINTS = ("/proc", "/sys", "/dev", "/tmp", "/run")


def render_init_script(python: str, sys_path: Sequence[str]) -> str:
    """The text of ``/init``: run ``python`` with ``sys_path`` and hand over to the init.

    ``python`` is the interpreter's absolute path inside the image; ``sys_path``
    is the complete module search path (stdlib zip and dirs, lib-dynload,
    site-packages, the directory holding ``uniframe``), in order.
    """
    if not python.startswith("/") or any(c.isspace() for c in python):
        raise ValueError(f"python must be an absolute path without whitespace, got {python!r}")
    shebang = f"#!{python} {PYTHON_FLAGS}"
    if len(shebang) + 1 > _BINPRM_BUF_SIZE:
        raise ValueError(
            f"the #! line is {len(shebang)} bytes; the kernel reads only {_BINPRM_BUF_SIZE - 1}: "
            "install the interpreter at a shorter path in the image")
    path = [p for p in sys_path if p]
    if any(not p.startswith("/") for p in path):
        raise ValueError(f"sys_path entries must be absolute paths, got {path!r}")
    lines = [
        shebang,
        "# uniframe PID 1, written by the image builder (uniframe.guest.initscript).",
        "import sys",
        "sys.path[:] = [",
        *(f"    {p!r}," for p in path),
        "]",
        "from uniframe.guest.init import main",
        "main()",
    ]
    return "\n".join(lines) + "\n"
