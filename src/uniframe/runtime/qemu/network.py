"""Bridged networking for microVMs (root only): bridge and taps; ports and addresses via hostnet.

User-mode networking (QEMU's slirp, the default) needs no privileges but
copies every packet through QEMU; a bridge gives guests real addresses that
other guests and the host reach directly. The layout mirrors what container
users know from Docker:

- bridge ``uniframe0`` with ``10.88.0.1/16``; one tap per VM (``uf`` + id);
- the guest's address is leased from the host network's bridge pool
  (:mod:`uniframe.runtime.hostnet`), which also holds the published ports
  of every driver, so a port a container publishes is refused here too;
- published ports become nftables DNAT rules in table ``ip uniframe``,
  written by hostnet from its records. Connections to ``127.0.0.1`` work
  too: ``route_localnet`` on the bridge plus masquerading of loopback
  sources, as Docker does without its userland proxy.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniframe.errors import RuntimeDriverError
from uniframe.runtime import hostnet
from uniframe.runtime.replica import Replica

BRIDGE = "uniframe0"
GATEWAY = ipaddress.IPv4Interface((hostnet.BRIDGE.block(1).network_address, hostnet.BRIDGE.subnet.prefixlen))
NFT_TABLE = hostnet.BRIDGE.nft_table


@dataclass(frozen=True)
class Attachment:
    guest_ip: str
    tap: str
    netdev: str
    ip_arg: str


def tap_name(replica_id: str) -> str:
    return f"uf{replica_id[:12]}"[:15]


def _ipr() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _sysctl(path: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys", path).write_text(value)


def ensure_bridge() -> None:
    """Create ``uniframe0`` with the gateway address, if it is not there yet."""
    with _ipr() as ipr:
        if not ipr.link_lookup(ifname=BRIDGE):
            ipr.link("add", ifname=BRIDGE, kind="bridge")
        idx = ipr.link_lookup(ifname=BRIDGE)[0]
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=2)}
        if str(GATEWAY.ip) not in have:
            ipr.addr("add", index=idx, address=str(GATEWAY.ip), prefixlen=GATEWAY.network.prefixlen)
        ipr.link("set", index=idx, state="up")
    _sysctl("net/ipv4/ip_forward", "1")
    _sysctl(f"net/ipv4/conf/{BRIDGE}/route_localnet", "1")


def _create_tap(name: str) -> None:
    with _ipr() as ipr:
        if not ipr.link_lookup(ifname=name):
            ipr.link("add", ifname=name, kind="tuntap", mode="tap")
        idx = ipr.link_lookup(ifname=name)[0]
        bridge = ipr.link_lookup(ifname=BRIDGE)[0]
        ipr.link("set", index=idx, master=bridge, state="up")


def _delete_tap(name: str) -> None:
    with _ipr() as ipr:
        for idx in ipr.link_lookup(ifname=name):
            ipr.link("del", index=idx)


def _clear_orphans(net: hostnet.HostNet) -> None:
    """Taps of replicas whose directory vanished: remove them, then hand their address on."""
    for replica_id in net.orphans(hostnet.BRIDGE):
        _delete_tap(tap_name(replica_id))
        net.release(replica_id)


def attach(state_root: Path, replica: Replica) -> Attachment:
    """Claim the replica's ports, lease it a bridge address, and plug a tap into the bridge."""
    if os.geteuid() != 0:
        raise RuntimeDriverError("--net bridge needs root (it creates a bridge and tap devices); run as root or use --net user")
    tap = tap_name(replica.id)
    with hostnet.locked(state_root) as net:
        _clear_orphans(net)
        net.claim(hostnet.Owner.of(replica), replica.config.ports)
        lease = net.lease(replica.id, hostnet.BRIDGE)
        try:
            ensure_bridge()
            _create_tap(tap)
        except BaseException:
            with contextlib.suppress(Exception):
                _delete_tap(tap)
            net.release(replica.id)
            raise
    mask = GATEWAY.network.netmask
    return Attachment(lease.guest_ip, tap, f"tap,id=net0,ifname={tap},script=no,downscript=no",
                      f"ip={lease.guest_ip}::{GATEWAY.ip}:{mask}::eth0:off")


def detach(state_root: Path, replica_id: str, tap: str | None) -> None:
    """Undo :func:`attach`: the tap, then the lease and port claims (safe to call twice)."""
    with hostnet.locked(state_root) as net:
        if tap and os.geteuid() == 0:
            _delete_tap(tap)
        net.release(replica_id)
