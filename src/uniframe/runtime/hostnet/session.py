"""The host's network book under its one lock: claim ports, lease addresses, release.

Several processes share one host (the CLI, the daemon, its worker threads),
and each may start replicas of any driver. Checking that a port is free and
then taking it must be one step for all of them, or two starts at the same
moment both see the port free; and DNAT binds no socket, so a port a
container publishes looks free to ``bind``. So every claim and lease happens
inside :func:`locked`: an exclusive ``flock`` on ``hostnet/lock`` (once per host
for root: :func:`hostnet_dir`)
(one per open, so threads of one process exclude each other too), then the
records are read, checked, changed and written before the lock is let go.

Nothing held can leak for ever: on every opening, holdings whose replica
directory is gone, or whose processes have all died, give their ports back
(a crash frees its ports at the next claim by anyone). Their address leases
stay until the driver that made the devices tears them down (see
:meth:`HostNet.orphans`), because a lease handed on while the old veth or tap
still carries the address would route to the wrong place.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from uniframe.errors import RuntimeDriverError
from uniframe.runtime.hostnet import claims, legacy, nat, records
from uniframe.runtime.hostnet.pools import POOLS, Lease, Pool
from uniframe.runtime.hostnet.records import Holding, Owner
from uniframe.runtime.ports import PortInUseError, PortMapping, ensure_free
from uniframe.runtime.process import ProcessRef

log = logging.getLogger("uniframe.runtime.hostnet")


HOST_DIR = Path("/run/uniframe/hostnet")


def hostnet_dir(state_root: Path) -> Path:
    """Where the records and the lock live: once per host for root, else in ``state_root``.

    Ports, addresses and nftables tables belong to the host, not to one state
    directory: two uniframe state roots on one host (a second daemon, a CLI with
    its own ``UNIFRAME_STATE``, two test runs) must see each other's claims, or
    both lease the same /30 and each rewrites the shared nftables table from its
    own records, dropping the other's forwards. So root keeps them in
    ``/run/uniframe/hostnet`` (tmpfs: they last exactly as long as the devices and
    rules they describe, until reboot). An ordinary user leases no addresses and
    writes no tables; their port claims stay in their own state directory, and
    ``bind`` still catches a port someone else listens on. ``$UNIFRAME_HOSTNET``
    points elsewhere (tests of the records themselves).
    """
    override = os.environ.get("UNIFRAME_HOSTNET")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return HOST_DIR
    return state_root / "hostnet"


class HostNet:
    """The claim and lease records, open under the lock (made by :func:`locked`)."""

    def __init__(self, state_root: Path) -> None:
        self._dir = hostnet_dir(state_root) / "holdings"
        self._holdings = records.load_all(self._dir)
        self._dirty: set[str] = set()  # pools whose nftables table must be rewritten
        for holding in legacy.import_books(state_root):
            if holding.owner.replica_id not in self._holdings:
                self._put(holding)
        self._sweep()

    # -- reading ---------------------------------------------------------------

    def holding(self, replica_id: str) -> Holding | None:
        return self._holdings.get(replica_id)

    def holdings(self) -> list[Holding]:
        return list(self._holdings.values())

    def forwards(self, pool: Pool) -> list[nat.Forward]:
        """Every published port forwarded into ``pool``, with the guest address it goes to."""
        out = []
        for h in self._holdings.values():
            for name, index in h.leases:
                if name == pool.name:
                    out += [(port, Lease(pool, index).guest_ip) for port in h.ports]
        return out

    def orphans(self, pool: Pool) -> list[str]:
        """Replicas whose directory is gone but who still lease from ``pool``.

        The driver that owns the pool tears their devices down and then
        :meth:`release`\\ s them; until then their block is not handed on.
        """
        return [h.owner.replica_id for h in self._holdings.values()
                if not h.owner.dir.is_dir() and any(name == pool.name for name, _ in h.leases)]

    # -- changing --------------------------------------------------------------

    def claim(self, owner: Owner, ports: Iterable[PortMapping]) -> None:
        """Publish ``ports`` for ``owner``, or raise :class:`PortInUseError` naming who has them.

        Replaces what ``owner`` published before. The claim lives as long as
        the calling process until :meth:`bind` hands it to the replica's own.
        """
        wanted = tuple(ports)
        twice = claims.self_overlap(wanted)
        if twice is not None:
            raise PortInUseError(f"host port {twice[1].host_port} is published twice ({twice[0]} and "
                                 f"{twice[1]}); give each -p its own host port")
        for h in self._holdings.values():
            if h.owner.replica_id == owner.replica_id:
                continue
            hit = claims.first_overlap(wanted, h.ports)
            if hit is not None:
                want, have = hit
                raise PortInUseError(
                    f"host port {want.host_ip}:{want.host_port}/{want.protocol} is already published by "
                    f"replica {h.owner.replica_id} ({h.owner.name}, {h.owner.driver}) as "
                    f"{have.host_ip}:{have.host_port}; pick another with -p OTHER:{want.guest_port}, "
                    f"or stop that replica ('uniframe stop {h.owner.name}')")
        ensure_free(list(wanted))  # something outside uniframe may listen there
        before = self._holdings.get(owner.replica_id)
        me = ProcessRef.of(os.getpid())
        leases = before.leases if before is not None else ()
        self._put(Holding(owner, (me,), wanted, leases))

    def bind(self, replica_id: str, processes: Iterable[ProcessRef]) -> None:
        """The replica's own processes now keep its claims: they are stale once all have died."""
        h = self._holdings.get(replica_id)
        if h is not None:
            self._put(replace(h, processes=tuple(processes)))

    def lease(self, replica_id: str, pool: Pool) -> Lease:
        """The replica's block in ``pool``: the one it holds, or the lowest free one."""
        h = self._holdings.get(replica_id)
        if h is None:
            raise RuntimeDriverError(f"replica {replica_id} asked for a {pool.name} address before "
                                     "claiming its ports (a driver bug: claim first, then lease)")
        for name, index in h.leases:
            if name == pool.name:
                return Lease(pool, index)
        taken = [i for other in self._holdings.values() for name, i in other.leases if name == pool.name]
        free = pool.free_index(taken)
        if free is None:
            raise RuntimeDriverError(f"no free {pool.name} address left in {pool.subnet}; "
                                     "remove stopped replicas ('uniframe rm')")
        self._put(replace(h, leases=(*h.leases, (pool.name, free))))
        return Lease(pool, free)

    def release(self, replica_id: str) -> Holding | None:
        """Give back everything the replica holds (safe to call twice)."""
        h = self._holdings.pop(replica_id, None)
        if h is not None:
            self._dirty.update(name for name, _ in h.leases)
            records.delete(self._dir, replica_id)
        return h

    def _put(self, holding: Holding) -> None:
        before = self._holdings.get(holding.owner.replica_id)
        touched = set(holding.leases) ^ set(before.leases if before else ())
        if before is None or set(before.ports) != set(holding.ports):
            touched |= set(holding.leases)
        self._dirty.update(name for name, _ in touched)
        self._holdings[holding.owner.replica_id] = holding
        records.save(self._dir, holding)

    def _sweep(self) -> None:
        """Take back the ports of replicas that are gone or dead; drop holdings with nothing left."""
        for h in list(self._holdings.values()):
            gone = not h.owner.dir.is_dir()
            dead = bool(h.processes) and not any(p.alive() for p in h.processes)
            if not (gone or dead) or (h.leases and not h.ports and not h.processes):
                continue  # alive, or already swept (its leases wait for its driver)
            if h.ports:
                log.info("reclaimed host ports %s of replica %s (%s): its %s", ", ".join(map(str, h.ports)),
                         h.owner.name, h.owner.replica_id, "directory is gone" if gone else "processes died")
            if h.leases:
                self._put(replace(h, ports=(), processes=()))
            else:
                self.release(h.owner.replica_id)

    def sync(self) -> None:
        """Rewrite the nftables table of every pool whose forwards or leases changed."""
        for name in sorted(self._dirty):
            pool = POOLS[name]
            in_use = any(n == name for h in self._holdings.values() for n, _ in h.leases)
            nat.apply(pool, self.forwards(pool), in_use)
        self._dirty.clear()


@contextlib.contextmanager
def locked(state_root: Path) -> Iterator[HostNet]:
    """The host's network records under the one lock; nftables follows them on the way out."""
    directory = hostnet_dir(state_root)
    (directory / "holdings").mkdir(parents=True, exist_ok=True)
    with (directory / "lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            net = HostNet(state_root)
            try:
                yield net
            except BaseException:
                try:
                    net.sync()
                except RuntimeDriverError as exc:  # keep the error that brought us here
                    log.warning("%s", exc)
                raise
            net.sync()
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
