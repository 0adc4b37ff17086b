"""The one interface every runtime implements, and the one replica lifecycle behind it.

The control plane and the CLI speak only this interface: create a replica
from an image, start, stop, inspect, wait, read logs, remove. The lifecycle
(process tracking, the recorded exit status, stop escalation, remove, log
tailing) is written once, in :class:`Driver`; a driver adds how it launches,
asks to stop and reads how a run ended. What each driver can do is declared
in its registry entry (:mod:`uniframe.runtime.registry`), not here.

Every driver keeps each replica's truth in ``<state>/replicas/<id>/`` with
the ``driver`` field naming its kind, so a fresh process finds any replica
and the driver that owns it (:func:`uniframe.runtime.registry.find`).
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from uniframe.errors import RuntimeDriverError
from uniframe.paths import state_dir
from uniframe.runtime.ports import ensure_free
from uniframe.runtime.process import ProcessRef, launched_alive
from uniframe.runtime.replica import Replica, ReplicaConfig, ReplicaState, ReplicaStatus, utcnow
from uniframe.runtime.snapshot import Snapshot

REPLICA_FILE = "replica.json"
STATUS_FILE = "exit.json"   # how the replica's last run ended, written once by whoever saw it end
FORCE_WAIT_S = 5.0          # how long each forced step of a stop is given
UNIX_PATH_MAX = 107


def log_tail(path: Path, lines: int = 5, skip: str = "") -> str:
    """The last ``lines`` lines of a log (for error messages), leaving out lines starting ``skip``."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(line for line in text.strip().splitlines()[-lines:]
                     if not (skip and line.startswith(skip)))


class ReplicaNotFoundError(RuntimeDriverError):
    """No replica answers to the id, id prefix or name given."""


class Driver(abc.ABC):
    """One replica lifecycle for every runtime; a driver supplies only what differs.

    The base owns the replica records (``<root>/<id>/replica.json``, written
    atomically), the tracked process (pid plus start time), how the end is
    recorded (``exit.json``, written once by whoever observes the end: stop,
    wait, reap or a failed start, never by a read), the stop escalation, remove
    and log tailing. A driver supplies:

    - :meth:`create` and :meth:`_launch`: record a replica; start its process;
    - :meth:`_until_started`: optionally, wait until the launch took (QMP answers, the
      container runs) and name the process to track if it is not the launched one;
    - :meth:`_ask_to_stop`: the graceful request (a console line, the ACPI
      button, SIGTERM); :meth:`_force_stop`, optionally, a forced one (QMP ``quit``);
    - :meth:`_how_it_ended`: how the run ended, read from what the driver
      left on disk (a console line, an exit code file); a pure read;
    - :meth:`_release`: give back what the replica held on the host (network,
      cgroups, containers); idempotent.

    Reads (:meth:`inspect`, :meth:`list`, :meth:`get`, :meth:`logs`) change
    nothing on disk or on the host. A replica that ended on its own keeps its
    resources until a path that changes state runs: :meth:`wait`, :meth:`stop`,
    :meth:`reap` (the reconciler's observation), :meth:`start` (a restart
    releases what the previous run left) or :meth:`remove`. A driver that
    tracks no host process (an in-memory fake) overrides the public methods instead.
    """

    kind: ClassVar[str]
    noun: ClassVar[str] = "replica"  # how errors name this driver's replicas
    log_file: ClassVar[str]          # the file in the replica directory that logs() tails
    stop_verb: ClassVar[str] = "stop"  # "did not <stop_verb> within N s" in a forced stop's detail
    root: Path

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir() / "replicas"
        # Processes this very object launched: asked through Popen, which also reaps them.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- records on disk -----------------------------------------------------

    def _save(self, replica: Replica) -> None:
        tmp = replica.dir / (REPLICA_FILE + ".tmp")
        tmp.write_text(json.dumps(replica.to_json(), indent=2) + "\n")
        os.replace(tmp, replica.dir / REPLICA_FILE)

    def _all(self) -> list[Replica]:
        """Every replica recorded under ``root``, whichever driver owns it, oldest first."""
        if not self.root.is_dir():
            return []
        replicas = []
        for d in self.root.iterdir():
            with contextlib.suppress(OSError, ValueError, KeyError):
                replicas.append(Replica.from_json(json.loads((d / REPLICA_FILE).read_text()), d))
        return sorted(replicas, key=lambda r: (r.created_at, r.id))

    def _allocate(self, name: str | None, base: str, longest: str = "") -> tuple[str, str, Path]:
        """A fresh (id, name, directory) for a new replica; the directory is made.

        ``base`` names the replica when the caller gave no name (plus part of the
        id); ``longest`` is the longest file name the replica puts in its
        directory as a unix socket, whose path must fit the kernel's limit.
        """
        if name and name in {r.name for r in self._all()}:
            raise RuntimeDriverError(f"a replica named {name!r} already exists; remove it with "
                                     f"'uniframe rm {name}' or pick another --name")
        replica_id = secrets.token_hex(6)
        directory = self.root / replica_id
        if longest and len(str(directory / longest)) > UNIX_PATH_MAX:
            raise RuntimeDriverError(
                f"state directory {self.root} is too deep for unix sockets "
                f"({len(str(directory / longest))} > {UNIX_PATH_MAX} bytes); "
                "point UNIFRAME_STATE at a shorter path")
        directory.mkdir(parents=True)
        clean = re.sub(r"[^A-Za-z0-9_.-]", "-", base)[:40] or self.kind
        return replica_id, name or f"{clean}-{replica_id[:4]}", directory

    def _record_new(self, replica_id: str, directory: Path, config: ReplicaConfig,
                    extra: dict[str, Any] | None = None) -> Replica:
        """Save and return the record of a replica made by :meth:`_allocate` (named by ``config``)."""
        assert config.name, "a new replica's config carries the name _allocate chose"
        replica = Replica(id=replica_id, name=config.name, dir=directory, config=config,
                          created_at=utcnow(), driver=self.kind, extra=dict(extra or {}))
        self._save(replica)
        return replica

    def list(self) -> list[Replica]:
        """This driver's replicas recorded on disk, oldest first."""
        return [r for r in self._all() if r.driver == self.kind]

    def get(self, ref: str) -> Replica:
        """A replica by id, unique id prefix, or name."""
        replicas = self.list()
        for r in replicas:
            if ref in (r.id, r.name):
                return r
        hits = [r for r in replicas if ref and r.id.startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ReplicaNotFoundError(f"{self.noun} id {ref!r} is ambiguous "
                                       f"({', '.join(r.id for r in hits)}); give more characters")
        known = ", ".join(f"{r.id} ({r.name})" for r in replicas) or "none"
        raise ReplicaNotFoundError(f"no {self.noun} {ref!r} in {self.root}; {self.noun}s: {known} "
                                   "(see 'uniframe ps -a')")

    def accelerator(self, replica: Replica) -> str | None:
        """The CPU accelerator the replica runs under (kvm, tcg), for drivers that have one."""
        return None

    # -- what a driver supplies ----------------------------------------------

    @abc.abstractmethod
    def create(self, config: ReplicaConfig) -> Replica:
        """Record a new replica on disk; nothing runs until :meth:`start`."""

    def _launch(self, replica: Replica) -> tuple[Replica, subprocess.Popen[bytes]]:
        """Start the replica's process detached; the replica as launched (argv, extra) and the process."""
        raise NotImplementedError(f"the {self.kind} driver launches no process: it overrides start()")

    def _until_started(self, replica: Replica, proc: subprocess.Popen[bytes]) -> ProcessRef | None:
        """Wait until the launch took, raising if it failed; the process to track if not ``proc``."""
        return None

    def _ask_to_stop(self, replica: Replica, deadline: float) -> None:
        """Ask the replica to shut down; may keep asking until ``deadline`` (monotonic)."""
        raise NotImplementedError(f"the {self.kind} driver overrides stop()")

    def _force_stop(self, replica: Replica) -> str | None:
        """Force the replica down short of SIGKILL; how that reads in the status, None if nothing."""
        return None

    def _how_it_ended(self, replica: Replica) -> ReplicaStatus:
        """How the replica's last run ended (exited or crashed), from its files; changes nothing."""
        raise NotImplementedError(f"the {self.kind} driver overrides inspect()")

    def _release(self, replica: Replica) -> None:
        """Give back what the replica holds on the host; safe to call again."""
        return None

    def _processes(self, replica: Replica) -> tuple[ProcessRef, ...]:
        """The processes whose life is the replica's (the one launched, as recorded)."""
        if replica.pid is None or replica.pid_start_time is None:
            return ()
        return (ProcessRef(replica.pid, replica.pid_start_time),)

    # -- the lifecycle --------------------------------------------------------

    def _alive(self, replica: Replica) -> bool:
        return any(launched_alive(p, self._children) for p in self._processes(replica))

    def _wait_gone(self, replica: Replica, seconds: float | None) -> bool:
        """Wait until the replica's processes are gone; False if they outlive ``seconds``."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while self._alive(replica):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def start(self, ref: str) -> Replica:
        """Start the replica detached and return once it is launched (not yet ready)."""
        replica = self.get(ref)
        if self._alive(replica):
            raise RuntimeDriverError(f"replica {replica.name} is already running")
        ensure_free(list(replica.config.ports))
        self._release(replica)  # whatever a run that ended unobserved still holds
        (replica.dir / STATUS_FILE).unlink(missing_ok=True)
        log = replica.dir / self.log_file
        replica = replica.with_(log_offset=log.stat().st_size if log.exists() else 0)
        replica, proc = self._launch(replica)
        self._children[proc.pid] = proc
        try:
            launched = ProcessRef.of(proc.pid)
        except ProcessLookupError:  # gone already: _until_started says why
            launched = ProcessRef(proc.pid, -1)
        replica = replica.with_(pid=launched.pid, pid_start_time=launched.start_time,
                                started_at=utcnow())
        self._save(replica)
        try:
            tracked = self._until_started(replica, proc)
        except BaseException:
            if proc.poll() is None:  # (once reaped, its pid could name another group)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self._end(replica)
            raise
        if tracked is not None:
            replica = replica.with_(pid=tracked.pid, pid_start_time=tracked.start_time)
            self._save(replica)
        return replica

    @staticmethod
    def _launched(replica: Replica) -> bool:
        """Whether the replica was ever launched (its record names a process or a start)."""
        return replica.pid is not None or replica.started_at is not None

    def _observe(self, replica: Replica) -> ReplicaStatus:
        if not self._launched(replica):
            return ReplicaStatus(ReplicaState.CREATED)
        if self._alive(replica):
            return ReplicaStatus(ReplicaState.RUNNING)
        return self._recorded(replica) or self._how_it_ended(replica)

    def _recorded(self, replica: Replica) -> ReplicaStatus | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return ReplicaStatus.from_json(json.loads((replica.dir / STATUS_FILE).read_text()))
        return None

    def _end(self, replica: Replica, how: str = "") -> ReplicaStatus:
        """The replica's status; if it has ended and nobody recorded that yet, record it and
        release what it held. ``how`` (a forced stop's words) replaces the driver's detail."""
        if not self._launched(replica):
            return ReplicaStatus(ReplicaState.CREATED)
        if self._alive(replica):
            return ReplicaStatus(ReplicaState.RUNNING)
        recorded = self._recorded(replica)
        if recorded is not None:
            return recorded
        status = self._how_it_ended(replica)
        status = replace(status, detail=how or status.detail,
                         finished_at=status.finished_at or utcnow())
        self._release(replica)
        path = replica.dir / STATUS_FILE
        tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.write_text(json.dumps(status.to_json()) + "\n")
            os.link(tmp, path)  # the first observer's account stands
        except FileExistsError:
            status = self._recorded(replica) or status
        except OSError:
            pass  # the directory went (removed meanwhile): nothing to record into
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return status

    def inspect(self, ref: str) -> ReplicaStatus:
        """Running, or how it ended; a pure read."""
        return self._observe(self.get(ref))

    def reap(self, ref: str) -> ReplicaStatus:
        """As :meth:`inspect`, but an end nobody has seen yet is recorded and its resources released."""
        return self._end(self.get(ref))

    def wait(self, ref: str, timeout: float | None = None) -> ReplicaStatus:
        """Block until the replica is no longer running (or ``timeout``); an end is recorded."""
        replica = self.get(ref)
        if not self._wait_gone(replica, timeout):
            return ReplicaStatus(ReplicaState.RUNNING)
        return self._end(replica)

    def stop(self, ref: str, timeout: float = 10.0) -> ReplicaStatus:
        """The graceful request for ``timeout`` seconds, then the forced stop, then SIGKILL."""
        replica = self.get(ref)
        if not self._alive(replica):
            return self._end(replica)
        if timeout > 0:
            deadline = time.monotonic() + timeout
            self._ask_to_stop(replica, deadline)
            if self._wait_gone(replica, max(0.0, deadline - time.monotonic())):
                return self._end(replica)
        late = f"did not {self.stop_verb} within {timeout:g} s; " if timeout > 0 else ""
        forced = self._force_stop(replica)
        if forced is not None and self._wait_gone(replica, FORCE_WAIT_S):
            return self._end(replica, late + forced)
        for process in self._processes(replica):
            process.signal(signal.SIGKILL)
        self._wait_gone(replica, FORCE_WAIT_S)
        return self._end(replica, late + "killed")

    def remove(self, ref: str, force: bool = False) -> Replica:
        """Delete the replica and everything it holds on the host (refuse if running unless forced)."""
        replica = self.get(ref)
        if self._alive(replica):
            if not force:
                raise RuntimeDriverError(f"replica {replica.name} is running; stop it first "
                                         f"('uniframe stop {replica.name}') or use rm -f")
            self.stop(replica.id, timeout=0)
        self._release(replica)
        shutil.rmtree(replica.dir, ignore_errors=True)
        return replica

    def logs(self, ref: str, follow: bool = False, offset: int = 0) -> Iterator[bytes]:
        """The replica's console or output from ``offset``; ``follow`` until it stops."""
        replica = self.get(ref)
        path = replica.dir / self.log_file
        while follow and not path.exists() and self._alive(replica):
            time.sleep(0.05)
        if not path.exists():
            return
        with path.open("rb") as fh:
            fh.seek(offset)
            while True:
                chunk = fh.read(65536)
                if chunk:
                    yield chunk
                    continue
                if not follow or not self._alive(replica):
                    rest = fh.read()
                    if rest:
                        yield rest
                    return
                time.sleep(0.05)

    # -- optional: snapshots (drivers with the "snapshot" capability override both) --------

    def snapshot(self, ref: str) -> Snapshot:
        """Save the running replica so :meth:`restore` can bring it back (see runtime.snapshot)."""
        raise RuntimeDriverError(
            f"the {self.kind} driver cannot snapshot replicas (it lacks the 'snapshot' "
            f"capability); {ref!r} stays as it is: stop it instead, or run it on a driver "
            "that can (see 'uniframe runtimes')")

    def remove_snapshot(self, snapshot: Snapshot) -> None:
        """Delete ``snapshot``'s bytes (a template whose revision retired); gone already is fine."""
        raise RuntimeDriverError(
            f"the {self.kind} driver keeps no snapshots (it lacks the 'snapshot' capability); "
            f"snapshot {snapshot.id} was taken by {snapshot.driver}: remove it there")

    def restore(self, snapshot: Snapshot, config: ReplicaConfig) -> Replica:
        """A new, running replica from ``snapshot``, which must be valid for ``config``."""
        raise RuntimeDriverError(
            f"the {self.kind} driver cannot restore snapshots (it lacks the 'snapshot' "
            f"capability); snapshot {snapshot.id} was taken by {snapshot.driver}: restore it "
            "there, or create and start a replica instead")
