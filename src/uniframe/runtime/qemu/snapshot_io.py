"""Saving and loading a microVM's device state over QMP, and copying its RAM file.

Facts measured on Debian's QEMU 7.2 (issue 11) that shape this module:

- RAM in a shared file backend plus the ``x-ignore-shared`` capability: the
  migration stream holds only the devices (~50-60 KB), saved in ~12 ms and
  loaded in ~5 ms. 7.2 refuses ``-global migration.x-ignore-shared=true``, so
  the capability is set over QMP, on both sides; the destination starts with
  ``-incoming defer`` so there is a moment to set it before ``migrate-incoming``.
- 7.2 has the ``exec:`` and ``fd:`` URIs but not ``file:``: the stream goes
  through ``cat``. The default ``max-bandwidth`` (128 MiB/s) throttles any
  RAM that is streamed (ROM blocks are), so it is raised.
- The source is stopped before the save, so the stream records a paused
  guest and the destination stays paused after the load (no ``-S`` needed)
  until ``cont``; nothing may reach a clone before ``cont`` returns (slirp's
  timers run on the guest clock, which jumps at the load: a SYN queued before
  ``cont`` stalls ~5.7 s).
- User-mode networking carries no TCP connection across a restore, so a
  replica is snapshotted only with no connection open on its published ports
  (:func:`open_connections`).
"""

from __future__ import annotations

import errno
import os
import shlex
import time
from pathlib import Path

from uniframe.errors import RuntimeDriverError
from uniframe.runtime.qemu.qmp import Qmp

MAX_BANDWIDTH = 1 << 40   # bytes/s: effectively unthrottled
POLL_S = 0.002


class MigrationError(RuntimeDriverError):
    """QEMU could not save or load a device state."""


def _capability(qmp: Qmp) -> None:
    qmp.execute("migrate-set-capabilities",
                {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})


def _until_done(qmp: Qmp, what: str, timeout: float) -> None:
    """Poll ``query-migrate`` until the migration completed; raise with QEMU's reason if it failed."""
    deadline = time.monotonic() + timeout
    status = "none"
    while time.monotonic() < deadline:
        info = qmp.execute("query-migrate")
        status = str(info.get("status", "none")) if isinstance(info, dict) else "none"
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            reason = info.get("error-desc", "no reason given") if isinstance(info, dict) else ""
            raise MigrationError(f"{what} {status}: {reason}")
        time.sleep(POLL_S)
    raise MigrationError(f"{what} did not complete within {timeout:g} s (status {status})")


def save_devices(qmp: Qmp, state: Path, timeout: float = 30.0) -> None:
    """Write the (stopped) guest's device state, without its shared RAM, to ``state``."""
    _capability(qmp)
    qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(state))}"})
    _until_done(qmp, "saving the device state", timeout)


def load_devices(qmp: Qmp, state: Path, timeout: float = 30.0) -> None:
    """Load ``state`` into a QEMU started with ``-incoming defer``; the guest stays paused."""
    _capability(qmp)
    qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state))}"})
    _until_done(qmp, "loading the device state", timeout)


def copy_sparse(source: Path, target: Path) -> int:
    """Copy ``source`` to ``target`` keeping its holes (pages the guest never touched);
    the bytes copied."""
    copied = 0
    with source.open("rb") as src, target.open("wb") as dst:
        size = os.fstat(src.fileno()).st_size
        position = 0
        while position < size:
            try:
                start = os.lseek(src.fileno(), position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            dst.seek(start)
            offset = start
            while offset < end:
                sent = os.sendfile(dst.fileno(), src.fileno(), offset, end - offset)
                if sent == 0:
                    break
                offset += sent
            copied += offset - start
            position = end
        dst.truncate(size)
    return copied


def allocated_bytes(path: Path) -> int:
    """What a (sparse) file really occupies."""
    return os.stat(path).st_blocks * 512


def open_connections(pid: int, host_ports: set[int]) -> int:
    """TCP connections the process holds open on one of ``host_ports`` (QEMU's ``hostfwd``
    listeners accept them with the published port as their local port)."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for fd in fd_dir.iterdir():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return 0
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "01":  # 01: ESTABLISHED
                continue
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if port in host_ports and fields[9] in inodes:
                count += 1
    return count
