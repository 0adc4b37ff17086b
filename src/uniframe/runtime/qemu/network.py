"""Bridged networking for microVMs (root only): bridge, taps, addresses, published ports.

User-mode networking (QEMU's slirp, the default) needs no privileges but
copies every packet through QEMU; a bridge gives guests real addresses that
other guests and the host reach directly. The layout mirrors what container
users know from Docker:

- bridge ``uniframe0`` with ``10.88.0.1/16``; one tap per VM (``uf`` + id);
- guest addresses leased from files under ``<state>/network/leases`` (one file
  per address holding the replica id), so any process sees who holds what;
- published ports become nftables DNAT rules in table ``ip uniframe``. The
  table is regenerated whole from ``<state>/network/ports/*.json`` on every
  change, so a crashed CLI can never leave a rule nobody knows how to remove.
  Connections to ``127.0.0.1`` work too: ``route_localnet`` on the bridge plus
  masquerading of loopback sources, as Docker does without its userland proxy.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniframe.errors import RuntimeDriverError
from uniframe.runtime.ports import PortInUseError, PortMapping

log = logging.getLogger("uniframe.runtime.qemu")

BRIDGE = "uniframe0"
GATEWAY = ipaddress.IPv4Interface("10.88.0.1/16")
NFT_TABLE = "uniframe"


@dataclass(frozen=True)
class Attachment:
    guest_ip: str
    tap: str
    netdev: str
    ip_arg: str


def _netdir(state_root: Path) -> Path:
    return state_root / "network"


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


def _lease(netdir: Path, replica_id: str) -> str:
    leases = netdir / "leases"
    for f in leases.iterdir():
        if f.read_text().strip() == replica_id:
            return f.name
    for host in GATEWAY.network.hosts():
        if host == GATEWAY.ip:
            continue
        path = leases / str(host)
        try:
            with path.open("x") as fh:
                fh.write(replica_id)
            return str(host)
        except FileExistsError:
            continue
    raise RuntimeDriverError(f"no free address left in {GATEWAY.network}; remove stopped replicas ('uniframe rm')")


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


def _check_ports_unclaimed(netdir: Path, replica_id: str, ports: list[PortMapping]) -> None:
    for f in (netdir / "ports").glob("*.json"):
        if f.stem == replica_id:
            continue
        with contextlib.suppress(OSError, ValueError):
            taken = {int(r["host_port"]) for r in json.loads(f.read_text())}
            for p in ports:
                if p.host_port in taken:
                    raise PortInUseError(
                        f"host port {p.host_port} is already published by replica {f.stem}; "
                        f"pick another with -p OTHER:{p.guest_port}"
                    )


def attach(state_root: Path, replica_id: str, ports: list[PortMapping]) -> Attachment:
    """A tap on the bridge, a leased guest address, and DNAT for ``ports``."""
    if os.geteuid() != 0:
        raise RuntimeDriverError("--net bridge needs root (it creates a bridge and tap devices); run as root or use --net user")
    tap = f"uf{replica_id[:12]}"[:15]
    with _locked(state_root) as netdir:
        ensure_bridge()
        _check_ports_unclaimed(netdir, replica_id, ports)
        guest_ip = _lease(netdir, replica_id)
        _create_tap(tap)
        rules = [{**p.to_json(), "guest_ip": guest_ip} for p in ports]
        (netdir / "ports" / f"{replica_id}.json").write_text(json.dumps(rules) + "\n")
        _apply_nat(netdir)
    mask = GATEWAY.network.netmask
    return Attachment(guest_ip, tap, f"tap,id=net0,ifname={tap},script=no,downscript=no",
                      f"ip={guest_ip}::{GATEWAY.ip}:{mask}::eth0:off")


def detach(state_root: Path, replica_id: str, tap: str | None, guest_ip: str | None) -> None:
    """Undo :meth:`attach`: tap, lease and port rules (safe to call twice)."""
    if os.geteuid() != 0 or not _netdir(state_root).is_dir():
        return
    with _locked(state_root) as netdir:
        if tap:
            _delete_tap(tap)
        if guest_ip:
            lease = netdir / "leases" / guest_ip
            with contextlib.suppress(OSError):
                if lease.read_text().strip() == replica_id:
                    lease.unlink()
        ports = netdir / "ports" / f"{replica_id}.json"
        if ports.exists():
            ports.unlink()
            _apply_nat(netdir)


def nat_ruleset(rules: list[dict[str, object]]) -> str:
    """The whole ``ip uniframe`` nftables table for the published ports in ``rules``."""
    pre, out = [], []
    for r in rules:
        target = f"dnat to {r['guest_ip']}:{r['guest_port']}"
        if r["host_ip"] in ("0.0.0.0", ""):
            match = f"fib daddr type local tcp dport {r['host_port']}"
        else:
            match = f"ip daddr {r['host_ip']} tcp dport {r['host_port']}"
        pre.append(f"    {match} {target}")
        out.append(f"    {match} {target}")
    return "\n".join([
        f"table ip {NFT_TABLE} {{",
        "  chain prerouting {", "    type nat hook prerouting priority dstnat;", *pre, "  }",
        "  chain output {", "    type nat hook output priority -100;", *out, "  }",
        "  chain postrouting {", "    type nat hook postrouting priority srcnat;",
        f'    ip saddr 127.0.0.0/8 oifname "{BRIDGE}" masquerade',
        f'    ip saddr {GATEWAY.network} ip daddr != {GATEWAY.network} masquerade', "  }",
        "}",
    ]) + "\n"


def _apply_nat(netdir: Path) -> None:
    rules: list[dict[str, object]] = []
    for f in sorted((netdir / "ports").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            rules += json.loads(f.read_text())
    nft = shutil.which("nft")
    if nft is None:
        if rules:
            log.warning("nft is not installed, so published ports are not forwarded on the bridge "
                        "(apt-get install nftables); reach guests at their 10.88.x.y address")
        return
    script = f"table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n" + nat_ruleset(rules)
    proc = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeDriverError(f"nft could not publish ports: {proc.stderr.strip()}")
