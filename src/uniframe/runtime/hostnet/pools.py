"""Address pools: where every guest address on this host comes from.

A bridged microVM gets one address on the ``uniframe0`` bridge; a container
gets a /30 on its own veth pair. Both are handed out by one allocator from
pools declared here, side by side, so their subnets can be checked against
each other once (:func:`check_disjoint`) instead of being two constants in
two driver packages that nobody compares. A lease is a pool and a block
index; the addresses follow from the pool, so a lease record needs no more.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Pool:
    """A subnet cut into equal blocks; one block per lease.

    ``reserved`` are block indices never leased (the bridge's network,
    gateway and broadcast addresses); ``guest_offset`` is where the guest's
    own address sits inside its block, which is where published ports are
    forwarded to; ``nft_table`` is the nftables table holding the pool's
    DNAT and masquerade rules.
    """

    name: str
    subnet: ipaddress.IPv4Network
    prefixlen: int
    nft_table: str
    guest_offset: int
    reserved: frozenset[int] = frozenset()

    @property
    def size(self) -> int:
        """How many blocks the subnet holds (reserved ones included)."""
        return 1 << (self.prefixlen - self.subnet.prefixlen)

    def block(self, index: int) -> ipaddress.IPv4Network:
        if not 0 <= index < self.size:
            raise ValueError(f"block {index} is outside pool {self.name} ({self.size} blocks)")
        base = int(self.subnet.network_address) + (index << (32 - self.prefixlen))
        return ipaddress.IPv4Network((base, self.prefixlen))

    def free_index(self, taken: Iterable[int]) -> int | None:
        """The lowest block that is neither reserved nor in ``taken``."""
        used = set(taken) | self.reserved
        return next((i for i in range(self.size) if i not in used), None)


@dataclass(frozen=True)
class Lease:
    """One block of one pool, held by one replica."""

    pool: Pool
    index: int

    @property
    def block(self) -> ipaddress.IPv4Network:
        return self.pool.block(self.index)

    @property
    def guest_ip(self) -> str:
        """The replica's own address: where its published ports are forwarded to."""
        return str(self.block.network_address + self.pool.guest_offset)

    @property
    def host_ip(self) -> str:
        """The host's end of a point-to-point block (a /30's first usable address)."""
        return str(self.block.network_address + 1)


# A bridged microVM: one address on uniframe0 (10.88.0.1 is the bridge, the gateway).
BRIDGE = Pool("bridge", ipaddress.IPv4Network("10.88.0.0/16"), 32, "uniframe", guest_offset=0,
              reserved=frozenset({0, 1, (1 << 16) - 1}))
# A container: a /30 per veth pair, host .1, container .2.
VETH = Pool("veth", ipaddress.IPv4Network("10.89.0.0/16"), 30, "uniframe_runc", guest_offset=2)

POOLS = {pool.name: pool for pool in (BRIDGE, VETH)}


def check_disjoint(pools: Iterable[Pool]) -> None:
    """Raise ValueError if two pools share an address or an nftables table."""
    seen: list[Pool] = []
    for pool in pools:
        for other in seen:
            if pool.subnet.overlaps(other.subnet) or pool.nft_table == other.nft_table:
                raise ValueError(f"address pools {other.name} ({other.subnet}, table {other.nft_table}) "
                                 f"and {pool.name} ({pool.subnet}, table {pool.nft_table}) overlap")
        seen.append(pool)


check_disjoint(POOLS.values())
