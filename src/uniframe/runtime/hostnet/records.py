"""What each replica holds on the host's network, one JSON file per replica.

``<hostnet>/holdings/<replica id>.json`` (``/run/uniframe/hostnet`` for root) names the replica (id, name,
driver, directory), the processes whose life keeps its claims valid, the
host ports it publishes and the address blocks it leases. Any process (the
CLI, the daemon) reads the same files, so who holds what is never a fact kept
in one process's memory; files are replaced atomically, so a reader never
meets half a record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniframe.runtime.ports import PortMapping
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.replica import Replica

log = logging.getLogger("uniframe.runtime.hostnet")


@dataclass(frozen=True)
class Owner:
    """The replica a holding belongs to; its directory vanishing means the replica is gone."""

    replica_id: str
    name: str
    driver: str
    dir: Path

    @classmethod
    def of(cls, replica: Replica) -> Owner:
        return cls(replica.id, replica.name, replica.driver, replica.dir)


@dataclass(frozen=True)
class Holding:
    """Host ports and address blocks one replica holds, and the processes that hold them.

    ``processes`` is who must still be alive for the ports to stay claimed:
    the replica's own processes once launched, or the process that claimed
    them while it is launching the replica. ``leases`` are (pool name, block
    index) pairs.
    """

    owner: Owner
    processes: tuple[ProcessRef, ...] = ()
    ports: tuple[PortMapping, ...] = ()
    leases: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"replica": self.owner.replica_id, "name": self.owner.name, "driver": self.owner.driver,
                "dir": str(self.owner.dir),
                "processes": [[p.pid, p.start_time] for p in self.processes],
                "ports": [p.to_json() for p in self.ports],
                "leases": [[pool, index] for pool, index in self.leases]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Holding:
        owner = Owner(str(data["replica"]), str(data["name"]), str(data["driver"]), Path(data["dir"]))
        return cls(owner,
                   tuple(ProcessRef(int(pid), int(start)) for pid, start in data["processes"]),
                   tuple(PortMapping.from_json(p) for p in data["ports"]),
                   tuple((str(pool), int(index)) for pool, index in data["leases"]))


def load_all(directory: Path) -> dict[str, Holding]:
    """Every holding recorded in ``directory``, by replica id."""
    holdings: dict[str, Holding] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            holding = Holding.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable network record %s: %s", path, exc)
            continue
        holdings[holding.owner.replica_id] = holding
    return holdings


def save(directory: Path, holding: Holding) -> None:
    path = directory / f"{holding.owner.replica_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(holding.to_json()) + "\n")
    os.replace(tmp, path)


def delete(directory: Path, replica_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / f"{replica_id}.json").unlink()
