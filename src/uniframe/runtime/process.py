"""Recognising a process again from another process, by PID *and* start time.

A PID written to disk is a weak name: after the process exits the kernel may
hand the same number to an unrelated program. The start time (field 22 of
``/proc/<pid>/stat``, in clock ticks since boot) tells the two apart, so a
replica is reported running only while the very process we launched lives.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces or ')'.
    return raw[raw.rindex(")") + 2 :].split()


@dataclass(frozen=True)
class ProcessRef:
    """A process as launched: its PID and the start time that pins the PID down."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        fields = _stat_fields(pid)
        if fields is None:
            raise ProcessLookupError(pid)
        return cls(pid, int(fields[19]))

    def alive(self) -> bool:
        """True while this very process runs (a zombie counts as gone)."""
        fields = _stat_fields(self.pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False
        return int(fields[19]) == self.start_time

    def reap(self) -> None:
        """Collect the exit of our own child so it does not linger as a zombie."""
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)

    def signal(self, sig: signal.Signals) -> bool:
        """Send ``sig`` if the process is still ours; False if it was already gone."""
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                found.append(int(entry.name))
    return found


def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until every process of group ``pgid`` has exited; True if they all did in time.

    A killed group's leader can be gone while a member is still being torn
    down, holding its listening socket: a restart right then finds the port taken.
    """
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def launched_alive(process: ProcessRef, children: dict[int, subprocess.Popen[bytes]]) -> bool:
    """Whether a process a driver launched still runs.

    A child of this very process is asked through its Popen (which also reaps
    it); any other is recognised by its start time and reaped if it is ours.
    """
    child = children.get(process.pid)
    if child is not None and child.poll() is not None:
        return False
    alive = process.alive()
    if not alive:
        process.reap()
    return alive
