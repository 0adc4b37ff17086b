"""Reaping orphans without stealing the app's own children.

PID 1 inherits every orphaned process; when one exits it stays a zombie until
PID 1 waits for it. Here PID 1 *is* the app, so the classic init answer (a
SIGCHLD handler looping ``waitpid(-1, WNOHANG)``) would also collect the
app's own children: ``subprocess`` then meets ``ECHILD`` and reports
returncode 0 for a child that failed.

The kernel does not record who spawned a child, so orphans and the app's
children look alike. The reaper tells them apart by patience: it only reaps a
zombie that has stayed unreaped for ``grace`` seconds. ``subprocess.run``,
``Popen.wait``/``communicate`` and ``Popen.poll`` loops collect their child
within milliseconds of its exit, so they always win; orphans have nobody else
waiting and are reaped after the grace period.

The trade-off: an app that leaves its own child unwaited for longer than
``grace`` after it exited (``uniframe.reap_grace``, default 5 s) loses that
child's exit status (``Popen`` then reports 0).

It polls instead of handling SIGCHLD so it never touches the app's signal
handlers or its one ``signal.set_wakeup_fd``: each tick is one ``waitid``
with ``WNOWAIT``, which only looks; ``/proc`` is scanned only while a zombie
exists.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

ZombieKey = tuple[int, int]  # (pid, start time in clock ticks): a reused pid is a new key


def zombie_children(parent: int, proc: str = "/proc") -> set[ZombieKey]:
    """Zombies whose parent is ``parent``, read from ``/proc/<pid>/stat``."""
    found: set[ZombieKey] = set()
    try:
        names = os.listdir(proc)
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc, name, "stat"), "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ... starttime(22nd)": comm may hold spaces or ')'.
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[0] == b"Z" and int(fields[1]) == parent:
            found.add((int(name), int(fields[19])))
    return found


class Reaper:
    """Collects zombie children that nobody else has collected for ``grace`` seconds."""

    def __init__(self, grace: float, *, proc: str = "/proc",
                 clock: Callable[[], float] = time.monotonic,
                 on_reap: Callable[[int, int], None] | None = None) -> None:
        self.grace = grace
        self.proc = proc
        self.clock = clock
        self.on_reap = on_reap
        self.reaped: list[tuple[int, int]] = []  # (pid, exit code) in order
        self._first_seen: dict[ZombieKey, float] = {}
        self._stop = threading.Event()

    @property
    def interval(self) -> float:
        return min(1.0, max(0.05, self.grace / 4))

    def reap_once(self) -> list[tuple[int, int]]:
        """One tick: note new zombies, reap the ones older than the grace period."""
        try:
            peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            peek = None
        if peek is None:
            self._first_seen.clear()
            return []
        zombies = zombie_children(os.getpid(), self.proc) or {(peek.si_pid, 0)}
        now = self.clock()
        self._first_seen = {z: self._first_seen.get(z, now) for z in zombies}
        done = []
        for (pid, start), since in list(self._first_seen.items()):
            if now - since < self.grace:
                continue
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got = 0  # the app collected it in the meantime
            if got == pid:
                code = os.waitstatus_to_exitcode(status)
                done.append((pid, code))
                del self._first_seen[(pid, start)]
                if self.on_reap is not None:
                    self.on_reap(pid, code)
        self.reaped += done
        return done

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="uniframe-reaper", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        block_stop_signals()
        while not self._stop.wait(self.interval):
            self.reap_once()


def block_stop_signals() -> None:
    """Keep SIGTERM/SIGINT off helper threads, so they interrupt the app's main thread.

    A process-directed signal goes to any thread that does not block it; if it
    lands on a helper thread, a main thread blocked in ``accept()`` or
    ``sleep()`` is not interrupted and the Python handler waits for it.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
