"""The nftables table of an address pool: DNAT for published ports, masquerade for guests.

Each pool has one table (``ip uniframe`` for the bridge, ``ip uniframe_runc``
for veth pairs), regenerated whole from the claim records on every change and
deleted when the pool has no lease left, so no rule outlives its replica and
a crashed CLI leaves nothing the next change does not rewrite. Connections to
``127.0.0.1`` work too: the driver sets ``route_localnet`` on its host-side
device and loopback sources are masqueraded, as Docker does without its
userland proxy; the data path stays in the kernel.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence

from uniframe.errors import RuntimeDriverError
from uniframe.runtime.hostnet.claims import WILDCARDS
from uniframe.runtime.hostnet.pools import Pool
from uniframe.runtime.ports import PortMapping

log = logging.getLogger("uniframe.runtime.hostnet")

Forward = tuple[PortMapping, str]  # a published port and the guest address it goes to


def ruleset(pool: Pool, forwards: Sequence[Forward]) -> str:
    """The whole table of ``pool`` for ``forwards``."""
    dnat = []
    for port, guest_ip in forwards:
        proto = f"{port.protocol} dport {port.host_port}"
        match = (f"fib daddr type local {proto}" if port.host_ip in WILDCARDS
                 else f"ip daddr {port.host_ip} {proto}")
        dnat.append(f"    {match} dnat to {guest_ip}:{port.guest_port}")
    return "\n".join([
        f"table ip {pool.nft_table} {{",
        "  chain prerouting {", "    type nat hook prerouting priority dstnat;", *dnat, "  }",
        "  chain output {", "    type nat hook output priority -100;", *dnat, "  }",
        "  chain postrouting {", "    type nat hook postrouting priority srcnat;",
        f"    ip saddr 127.0.0.0/8 ip daddr {pool.subnet} masquerade",
        f"    ip saddr {pool.subnet} ip daddr != {pool.subnet} masquerade",
        "  }",
        "}",
    ]) + "\n"


def apply(pool: Pool, forwards: Sequence[Forward], in_use: bool) -> None:
    """Replace the pool's table (or drop it when no replica holds a lease in the pool)."""
    if os.geteuid() != 0:
        return  # only root leases addresses; an ordinary user's records never need a table
    nft = shutil.which("nft")
    if nft is None:
        if forwards:
            log.warning("nft is not installed, so published ports are not forwarded to %s guests "
                        "(apt-get install nftables); reach them at their %s address", pool.name, pool.subnet)
        return
    script = f"table ip {pool.nft_table}\ndelete table ip {pool.nft_table}\n"
    if in_use:
        script += ruleset(pool, forwards)
    proc = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeDriverError(f"nft could not update published ports (table ip {pool.nft_table}): "
                                 f"{proc.stderr.strip()}")
