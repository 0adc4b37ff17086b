"""The one interface every runtime implements (drivers are declared in runtime/registry.py).

The control plane and the CLI speak only this interface: create a replica
from an image, start, stop, inspect, read logs, remove. What a driver can do
beyond that is declared in ``capabilities`` (a set of plain strings) so
callers ask instead of guessing::

    port-forward     published host ports reach the replica
    bridge-network   the replica can get its own address on a host bridge (root)
    host-network     the replica can share the host's network
    cgroup-limits    CPU and memory limits are enforced by cgroups
    console          a serial console the host can type into
    snapshot         the replica can be saved and restored (QEMU migration)
    logs             logs can be read and followed

Every driver keeps each replica's truth in ``<state>/replicas/<id>/`` with
the ``driver`` field naming its kind, so a fresh process finds any replica
and the driver that owns it (:func:`uniframe.runtime.registry.find`).
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

from uniframe.errors import RuntimeDriverError
from uniframe.runtime.replica import Replica, ReplicaConfig, ReplicaStatus
from uniframe.runtime.snapshot import Snapshot

REPLICA_FILE = "replica.json"


class ReplicaNotFoundError(RuntimeDriverError):
    """No replica answers to the id, id prefix or name given."""


class Driver(abc.ABC):
    """Create, start, stop, inspect and remove replicas of one runtime on this host.

    The replica records themselves (``<root>/<id>/replica.json``, written
    atomically) are handled here, the same for every driver.
    """

    kind: ClassVar[str]
    noun: ClassVar[str] = "replica"  # how errors name this driver's replicas
    capabilities: ClassVar[frozenset[str]] = frozenset()
    root: Path

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

    @staticmethod
    def _read_log(path: Path, offset: int, follow: bool, running: Callable[[], bool]) -> Iterator[bytes]:
        """A log file from ``offset``; with ``follow``, until ``running()`` turns false."""
        while follow and not path.exists() and running():
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
                if not follow or not running():
                    rest = fh.read()
                    if rest:
                        yield rest
                    return
                time.sleep(0.05)

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

    @abc.abstractmethod
    def create(self, config: ReplicaConfig) -> Replica:
        """Record a new replica on disk; nothing runs until :meth:`start`."""

    @abc.abstractmethod
    def start(self, ref: str) -> Replica:
        """Start the replica detached and return once it is launched (not yet ready)."""

    @abc.abstractmethod
    def stop(self, ref: str, timeout: float = 10.0) -> ReplicaStatus:
        """Ask the replica to stop gracefully, force it after ``timeout`` seconds."""

    @abc.abstractmethod
    def remove(self, ref: str, force: bool = False) -> Replica:
        """Delete the replica and everything it holds on the host (refuse if running unless forced)."""

    @abc.abstractmethod
    def inspect(self, ref: str) -> ReplicaStatus:
        """Running, or how it ended."""

    @abc.abstractmethod
    def wait(self, ref: str, timeout: float | None = None) -> ReplicaStatus:
        """Block until the replica is no longer running (or ``timeout``)."""

    @abc.abstractmethod
    def logs(self, ref: str, follow: bool = False, offset: int = 0) -> Iterator[bytes]:
        """The replica's console or stdout/stderr, from ``offset``; ``follow`` until it stops."""

    # -- optional: snapshots (drivers with the "snapshot" capability override both) --------

    def snapshot(self, ref: str) -> Snapshot:
        """Save the running replica so :meth:`restore` can bring it back (see runtime.snapshot)."""
        raise RuntimeDriverError(
            f"the {self.kind} driver cannot snapshot replicas (it lacks the 'snapshot' "
            f"capability); {ref!r} stays as it is: stop it instead, or run it on a driver "
            "that can (see 'uniframe runtimes')")

    def restore(self, snapshot: Snapshot, config: ReplicaConfig) -> Replica:
        """A new, running replica from ``snapshot``, which must be valid for ``config``."""
        raise RuntimeDriverError(
            f"the {self.kind} driver cannot restore snapshots (it lacks the 'snapshot' "
            f"capability); snapshot {snapshot.id} was taken by {snapshot.driver}: restore it "
            "there, or create and start a replica instead")
