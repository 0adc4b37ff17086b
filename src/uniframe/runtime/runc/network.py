"""A network namespace per container, a veth pair to it, and published ports (root only).

Each replica gets ``/run/netns/uf-<id>`` and a veth pair: ``uf<id>`` on the
host with ``10.89.N.1/30`` and ``eth0`` inside with ``10.89.N.2/30``, default
route through the host side. A /30 per container needs no bridge, so there is
no shared device whose state could drift; the block ``N`` is leased from a
file under ``<state>/runc-network/leases`` holding the replica id.

Published ports are nftables DNAT rules in table ``ip uniframe_runc``,
regenerated whole from ``<state>/runc-network/ports/*.json`` on every change
and deleted when no replica needs it, so no rule outlives its replica and a
crashed CLI leaves nothing that the next change does not rewrite. Reaching a
container through ``127.0.0.1`` needs ``route_localnet`` on the host side of
the veth plus masquerading of loopback sources (a reply to 127.0.0.1 could not
leave the container otherwise); kernel DNAT keeps the data path in the kernel,
as Docker does without its userland proxy, so no forwarder process exists to
be leaked or to slow requests down.

The namespace is made with ``unshare --net=FILE`` rather than ``ip netns
add``, which would also turn ``/run/netns`` into a mount point that outlives
every replica.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from uniframe.errors import RuntimeDriverError
from uniframe.runtime.ports import PortInUseError, PortMapping

SUBNET = ipaddress.IPv4Network("10.89.0.0/16")
NFT_TABLE = "uniframe_runc"
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


def _netdir(state_root: Path) -> Path:
    return state_root / "runc-network"


@contextlib.contextmanager
def _locked(state_root: Path) -> Iterator[Path]:
    d = _netdir(state_root)
    (d / "leases").mkdir(parents=True, exist_ok=True)
    (d / "ports").mkdir(parents=True, exist_ok=True)
    with (d / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeDriverError(f"'ip {' '.join(args)}' failed: {proc.stderr.strip()}")
    return proc


def _sysctl(path: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys", path).write_text(value)


def _block(n: int) -> tuple[str, str]:
    base = int(SUBNET.network_address) + 4 * n
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def _lease(netdir: Path, replica_id: str) -> int:
    leases = netdir / "leases"
    for f in leases.iterdir():
        with contextlib.suppress(OSError):
            if f.read_text().strip() == replica_id:
                return int(f.name)
    for n in range(SUBNET.num_addresses // 4):
        try:
            with (leases / str(n)).open("x") as fh:
                fh.write(replica_id)
            return n
        except FileExistsError:
            continue
    raise RuntimeDriverError(f"no free /30 left in {SUBNET}; remove stopped replicas ('uniframe rm')")


def _release(netdir: Path, replica_id: str) -> None:
    for f in (netdir / "leases").iterdir():
        with contextlib.suppress(OSError):
            if f.read_text().strip() == replica_id:
                f.unlink()


def _published(state_root: Path, exclude: str) -> dict[tuple[str, int], str]:
    """(host ip, port) -> replica id for every port DNAT'ed by runc or bridged QEMU replicas."""
    taken: dict[tuple[str, int], str] = {}
    for directory in (_netdir(state_root) / "ports", state_root / "network" / "ports"):
        if not directory.is_dir():
            continue
        for f in directory.glob("*.json"):
            if f.stem == exclude:
                continue
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                for rule in json.loads(f.read_text()):
                    taken[(str(rule["host_ip"]), int(rule["host_port"]))] = f.stem
    return taken


def check_ports_unclaimed(state_root: Path, replica_id: str, ports: list[PortMapping]) -> None:
    """DNAT binds no socket, so a port another replica publishes looks free to ``bind``: ask the records."""
    taken = _published(state_root, replica_id)
    for p in ports:
        for (ip, port), owner in taken.items():
            if port == p.host_port and (ip == p.host_ip or "0.0.0.0" in (ip, p.host_ip)):
                raise PortInUseError(f"host port {p.host_port} is already published by replica {owner}; "
                                     f"pick another with -p OTHER:{p.guest_port}")


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


def attach(state_root: Path, replica_id: str, mode: str, ports: list[PortMapping]) -> Attachment:
    """Create the replica's namespace; for ``private`` also its veth pair, addresses and port rules."""
    if os.geteuid() != 0:
        raise RuntimeDriverError("container networking needs root (network namespaces, veth devices)")
    name = netns_name(replica_id)
    if mode == "none":
        _make_netns(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return Attachment(name)
    if ports and shutil.which("nft") is None:
        raise RuntimeDriverError("publishing container ports needs nftables; install it with "
                                 "'apt-get install nftables' (or run without -p)")
    host_if = host_if_name(replica_id)
    with _locked(state_root) as netdir:
        check_ports_unclaimed(state_root, replica_id, ports)
        n = _lease(netdir, replica_id)
        host_ip, container_ip = _block(n)
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
            rules = [{**p.to_json(), "container_ip": container_ip} for p in ports]
            (netdir / "ports" / f"{replica_id}.json").write_text(json.dumps(rules) + "\n")
            _apply_nat(netdir)
        except BaseException:
            _teardown(netdir, replica_id)
            raise
    return Attachment(name, host_if, host_ip, container_ip)


def _teardown(netdir: Path, replica_id: str) -> None:
    _ip("link", "del", host_if_name(replica_id), check=False)
    _delete_netns(netns_name(replica_id))
    rules = netdir / "ports" / f"{replica_id}.json"
    if rules.exists():
        rules.unlink()
    _release(netdir, replica_id)
    _apply_nat(netdir)


def detach(state_root: Path, replica_id: str) -> None:
    """Undo :func:`attach` whatever state it got to (safe to call twice, or for host networking)."""
    if os.geteuid() != 0:
        return
    if not _netdir(state_root).is_dir():
        _delete_netns(netns_name(replica_id))
        return
    with _locked(state_root) as netdir:
        _teardown(netdir, replica_id)


def nat_ruleset(rules: list[dict[str, object]]) -> str:
    """The whole ``ip uniframe_runc`` table for ``rules`` (one per published port)."""
    dnat = []
    for r in rules:
        if r["host_ip"] in ("0.0.0.0", ""):
            match = f"fib daddr type local tcp dport {r['host_port']}"
        else:
            match = f"ip daddr {r['host_ip']} tcp dport {r['host_port']}"
        dnat.append(f"    {match} dnat to {r['container_ip']}:{r['guest_port']}")
    return "\n".join([
        f"table ip {NFT_TABLE} {{",
        "  chain prerouting {", "    type nat hook prerouting priority dstnat;", *dnat, "  }",
        "  chain output {", "    type nat hook output priority -100;", *dnat, "  }",
        "  chain postrouting {", "    type nat hook postrouting priority srcnat;",
        f"    ip saddr 127.0.0.0/8 ip daddr {SUBNET} masquerade",
        f"    ip saddr {SUBNET} ip daddr != {SUBNET} masquerade",
        "  }",
        "}",
    ]) + "\n"


def _apply_nat(netdir: Path) -> None:
    rules: list[dict[str, object]] = []
    for f in sorted((netdir / "ports").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            rules += json.loads(f.read_text())
    nft = shutil.which("nft")
    if nft is None:
        return
    leased = any((netdir / "leases").iterdir())
    script = f"table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"
    if leased:
        script += nat_ruleset(rules)
    proc = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeDriverError(f"nft could not update published ports: {proc.stderr.strip()}")


def leftovers(replica_id: str) -> list[str]:
    """What of the replica's network still exists on the host (empty once it is cleaned up)."""
    found = []
    if (NETNS_DIR / netns_name(replica_id)).exists():
        found.append(f"netns {netns_name(replica_id)}")
    if _ip("link", "show", host_if_name(replica_id), check=False).returncode == 0:
        found.append(f"veth {host_if_name(replica_id)}")
    return found
