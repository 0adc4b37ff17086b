"""One host network for every driver: published-port claims and address leases, under one lock.

A host port is one resource whoever publishes it: QEMU's user-mode
``hostfwd`` and a process replica bind it, bridged microVMs and containers
DNAT it with nftables (which binds nothing, so ``bind`` alone cannot see it).
Every driver therefore claims its ports here before it launches anything, and
the claim is refused, naming the replica that holds the port, if any replica
of any driver already publishes an overlapping one (``0.0.0.0:8080`` overlaps
``127.0.0.1:8080``). Guest addresses (a bridge address per tap, a /30 per
veth pair) come from one allocator over disjoint pools. The plumbing (taps,
namespaces, veths) stays with each driver's ``network`` module, which asks
here for its lease; the nftables table of each pool is written from these
records, so it always matches them::

    claim_ports(state, replica, ports)   at start, before launching (raises PortInUseError)
    bind(state, replica.id, *processes)  once launched: the claims live as long as these
    release(state, replica.id)           at stop and remove (safe to call twice)
    with locked(state) as net: ...       leases, orphans, several steps under one lock

Modules: ``pools`` (the address pools and leases), ``claims`` (when two ports
overlap), ``records`` (one file per replica), ``session`` (the lock, stale
reclaim), ``nat`` (a pool's nftables table), ``legacy`` (the per-driver
records of earlier versions, taken over once).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from uniframe.runtime.hostnet.pools import BRIDGE, POOLS, VETH, Lease, Pool
from uniframe.runtime.hostnet.records import Holding, Owner
from uniframe.runtime.hostnet.session import HostNet, locked
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.replica import Replica

__all__ = ["BRIDGE", "POOLS", "VETH", "Holding", "HostNet", "Lease", "Owner", "Pool", "bind",
           "claim_ports", "locked", "release"]


def claim_ports(state_root: Path, replica: Replica, ports: Iterable[PortMapping]) -> None:
    """Claim ``ports`` for ``replica`` (all or none); raise PortInUseError naming any holder."""
    with locked(state_root) as net:
        net.claim(Owner.of(replica), ports)


def bind(state_root: Path, replica_id: str, *processes: ProcessRef) -> None:
    """Tie the replica's claims to its launched processes (stale once they have all died)."""
    with locked(state_root) as net:
        net.bind(replica_id, processes)


def release(state_root: Path, replica_id: str) -> None:
    """Give back the replica's ports and leases (its devices are its driver's to remove first)."""
    with locked(state_root) as net:
        net.release(replica_id)
