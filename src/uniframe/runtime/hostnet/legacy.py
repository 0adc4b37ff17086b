"""Records of the two per-driver network books that came before hostnet, read once.

Before one host network module existed, bridged microVMs kept their leases
and ports under ``<state>/network`` and containers under
``<state>/runc-network``. Replicas started then may still run after an
upgrade, so the first opening of the hostnet book takes their leases and
claims over (else their addresses and ports could be handed out twice), then
renames each old directory to ``*.imported`` so it is read only once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
from pathlib import Path
from typing import Any

from uniframe.runtime.hostnet.pools import BRIDGE, VETH, Pool
from uniframe.runtime.hostnet.records import Holding, Owner
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.process import ProcessRef

log = logging.getLogger("uniframe.runtime.hostnet")

# old directory -> (pool, driver kind of its replicas)
BOOKS = {"network": (BRIDGE, "qemu-microvm"), "runc-network": (VETH, "runc")}


def _index(pool: Pool, name: str) -> int:
    """A lease file's name as a block index: an address for the bridge, the index for veth."""
    if pool is BRIDGE:
        return int(ipaddress.IPv4Address(name)) - int(pool.subnet.network_address)
    return int(name)


def _owner(state_root: Path, replica_id: str, driver: str) -> tuple[Owner, tuple[ProcessRef, ...]]:
    directory = state_root / "replicas" / replica_id
    data: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((directory / "replica.json").read_text())
    refs = []
    extra = data.get("extra") or {}
    for pid, start in ((data.get("pid"), data.get("pid_start_time")),
                       (extra.get("shim_pid"), extra.get("shim_start_time"))):
        if pid is not None and start is not None:
            refs.append(ProcessRef(int(pid), int(start)))
    owner = Owner(replica_id, str(data.get("name", replica_id)), str(data.get("driver", driver)), directory)
    return owner, tuple(refs)


def import_books(state_root: Path) -> list[Holding]:
    """The holdings recorded in the old books under ``state_root``; the books are renamed."""
    found: dict[str, Holding] = {}
    for dirname, (pool, driver) in BOOKS.items():
        book = state_root / dirname
        if not (book / "leases").is_dir():
            continue
        for lease in sorted((book / "leases").iterdir()):
            try:
                replica_id, index = lease.read_text().strip(), _index(pool, lease.name)
            except (OSError, ValueError):
                continue
            ports: tuple[PortMapping, ...] = ()
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                rules = json.loads((book / "ports" / f"{replica_id}.json").read_text())
                ports = tuple(PortMapping.from_json(r) for r in rules)
            held = found.get(replica_id)
            if held is None:
                owner, refs = _owner(state_root, replica_id, driver)
                held = Holding(owner, refs)
            found[replica_id] = Holding(held.owner, held.processes, (*held.ports, *ports),
                                        (*held.leases, (pool.name, index)))
        book.rename(book.with_name(f"{dirname}.imported"))
        log.info("took over the %s network records of %s into hostnet", pool.name, book)
    return list(found.values())
