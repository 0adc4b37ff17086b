"""A network namespace per container and a veth pair to it (root only); ports and addresses via hostnet.

Each replica gets ``/run/netns/uf-<id>`` and a veth pair: ``uf<id>`` on the
host with ``10.89.N.1/30`` and ``eth0`` inside with ``10.89.N.2/30``, default
route through the host side. A /30 per container needs no bridge, so there is
no shared device whose state could drift; the block ``N`` is leased from the
host network's veth pool (:mod:`uniframe.runtime.hostnet`), which also holds
the published ports of every driver: a port a bridged microVM or a process
replica publishes is refused here, and the other way round.

Published ports are nftables DNAT rules in table ``ip uniframe_runc``, written
by hostnet from its records on every change and dropped when no container
holds a lease. Reaching a container through ``127.0.0.1`` needs
``route_localnet`` on the host side of the veth plus masquerading of loopback
sources (a reply to 127.0.0.1 could not leave the container otherwise);
kernel DNAT keeps the data path in the kernel, as Docker does without its
userland proxy, so no forwarder process exists to be leaked or to slow
requests down.

The namespace is made with ``unshare --net=FILE`` rather than ``ip netns
add``, which would also turn ``/run/netns`` into a mount point that outlives
every replica.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from uniframe.errors import RuntimeDriverError
from uniframe.runtime import hostnet
from uniframe.runtime.replica import Replica

NFT_TABLE = hostnet.VETH.nft_table
NETNS_DIR = Path("/run/netns")


@dataclass(frozen=True)
class Attachment:
    """What :func:`attach` set up for one replica."""

    netns: str
    host_if: str | None = None
    host_ip: str | None = None
    container_ip: str | None = None

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


def netns_name(replica_id: str) -> str:
    return f"uf-{replica_id}"


def host_if_name(replica_id: str) -> str:
    return f"uf{replica_id}"[:15]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeDriverError(f"'ip {' '.join(args)}' failed: {proc.stderr.strip()}")
    return proc


def _sysctl(path: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys", path).write_text(value)


def _make_netns(name: str) -> Path:
    path = NETNS_DIR / name
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    if path.exists():
        _delete_netns(name)
    path.touch()
    proc = subprocess.run(["unshare", f"--net={path}", "true"], capture_output=True, text=True)
    if proc.returncode != 0:
        path.unlink(missing_ok=True)
        raise RuntimeDriverError(f"cannot create network namespace {name}: {proc.stderr.strip()}")
    return path


def _delete_netns(name: str) -> None:
    path = NETNS_DIR / name
    if not path.exists():
        return
    subprocess.run(["umount", str(path)], capture_output=True)
    with contextlib.suppress(OSError):
        path.unlink()


def _delete_devices(replica_id: str) -> None:
    _ip("link", "del", host_if_name(replica_id), check=False)
    _delete_netns(netns_name(replica_id))


def _clear_orphans(net: hostnet.HostNet) -> None:
    """Devices of containers whose directory vanished: remove them, then hand their /30 on."""
    for replica_id in net.orphans(hostnet.VETH):
        _delete_devices(replica_id)
        net.release(replica_id)


def attach(state_root: Path, replica: Replica, mode: str) -> Attachment:
    """Create the replica's namespace; for ``private`` also claim its ports, lease a /30, add the veth pair."""
    if os.geteuid() != 0:
        raise RuntimeDriverError("container networking needs root (network namespaces, veth devices)")
    name = netns_name(replica.id)
    if mode == "none":
        _make_netns(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return Attachment(name)
    if replica.config.ports and shutil.which("nft") is None:
        raise RuntimeDriverError("publishing container ports needs nftables; install it with "
                                 "'apt-get install nftables' (or run without -p)")
    host_if = host_if_name(replica.id)
    with hostnet.locked(state_root) as net:
        _clear_orphans(net)
        net.claim(hostnet.Owner.of(replica), replica.config.ports)
        lease = net.lease(replica.id, hostnet.VETH)
        host_ip, container_ip = lease.host_ip, lease.guest_ip
        try:
            _make_netns(name)
            _ip("link", "del", host_if, check=False)
            _ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
            _sysctl(f"net/ipv4/conf/{host_if}/route_localnet", "1")
            _ip("link", "set", host_if, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{container_ip}/30", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "route", "add", "default", "via", host_ip)
            _sysctl("net/ipv4/ip_forward", "1")
        except BaseException:
            _delete_devices(replica.id)
            net.release(replica.id)
            raise
    return Attachment(name, host_if, host_ip, container_ip)


def detach(state_root: Path, replica_id: str) -> None:
    """Undo :func:`attach` whatever state it got to (safe to call twice, or for host networking)."""
    with hostnet.locked(state_root) as net:
        if os.geteuid() == 0:
            _delete_devices(replica_id)
        net.release(replica_id)


def leftovers(replica_id: str) -> list[str]:
    """What of the replica's network still exists on the host (empty once it is cleaned up)."""
    found = []
    if (NETNS_DIR / netns_name(replica_id)).exists():
        found.append(f"netns {netns_name(replica_id)}")
    if _ip("link", "show", host_if_name(replica_id), check=False).returncode == 0:
        found.append(f"veth {host_if_name(replica_id)}")
    return found
