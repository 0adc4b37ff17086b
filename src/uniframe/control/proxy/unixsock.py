"""Unix sockets that only their owner can reach, bound in a directory only the owner can enter.

The daemon's API socket and every endpoint's control socket accept commands
from whoever can connect, and the daemon runs as root. So the socket file
must never exist, not even for an instant, with looser permissions than
0600 (``bind`` creates it with the process umask: it is bound under umask
0177), and its directory is 0700 and owned by us, so nobody else can swap
the file for a symlink. There is no fallback to a shared directory such as
``/tmp``: a path too long for ``sun_path`` is an error that says what to
shorten.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import stat
from pathlib import Path

SUN_PATH_MAX = 107
"""``sun_path`` holds 108 bytes including the terminating NUL."""


class UnixSocketError(OSError):
    """A private unix socket cannot be made where it was asked for (the message says why)."""


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700; refuse one owned by someone else."""
    path.mkdir(parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnixSocketError(errno.ENOTDIR, f"{path} is not a directory (a symlink?)")
    if info.st_uid != os.geteuid():
        raise UnixSocketError(errno.EPERM, f"{path} belongs to uid {info.st_uid}, not to us "
                              f"(uid {os.geteuid()}); remove it or choose another state directory")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def socket_path(directory: Path, name: str) -> Path:
    """``directory/name``, or a hashed short name in the same directory when that is too long."""
    path = directory / name
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        return path
    short = directory / (hashlib.sha256(name.encode()).hexdigest()[:16] + ".sock")
    if len(os.fsencode(short)) <= SUN_PATH_MAX:
        return short
    raise UnixSocketError(errno.ENAMETOOLONG,
                          f"{directory} is too long a directory for unix sockets ({SUN_PATH_MAX} "
                          "bytes at most with the file name): set UNIFRAME_STATE to a shorter path")


def _someone_listens(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind_private(path: Path, backlog: int, *, replace_live: bool = False) -> socket.socket:
    """A listening unix socket at ``path``: mode 0600 from its creation, in a 0700 directory.

    A stale socket file (nobody answers) is replaced; a live one is an error
    unless ``replace_live`` (an endpoint process that was told to take over).
    """
    private_dir(path.parent)
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise UnixSocketError(errno.EEXIST, f"{path} exists and is not a socket; remove it")
        if not replace_live and _someone_listens(path):
            raise UnixSocketError(errno.EADDRINUSE, f"another process already listens on {path}")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock
