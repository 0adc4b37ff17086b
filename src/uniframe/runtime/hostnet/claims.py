"""When two published host ports are the same port.

A socket bound to ``0.0.0.0:8080`` takes port 8080 on every address, and a
DNAT rule for ``0.0.0.0`` matches every local address, so a claim on the
wildcard overlaps every claim on the same port and protocol; two specific
addresses overlap only if they are equal. This is the single place that
rule lives: claims across drivers and within one request both ask it.
"""

from __future__ import annotations

from collections.abc import Iterable

from uniframe.runtime.ports import PortMapping

WILDCARDS = frozenset({"0.0.0.0", ""})


def overlap(a: PortMapping, b: PortMapping) -> bool:
    """Whether ``a`` and ``b`` would take the same host port."""
    if a.host_port != b.host_port or a.protocol != b.protocol:
        return False
    return a.host_ip == b.host_ip or a.host_ip in WILDCARDS or b.host_ip in WILDCARDS


def first_overlap(wanted: Iterable[PortMapping], held: Iterable[PortMapping]) -> tuple[PortMapping, PortMapping] | None:
    """The first (wanted, held) pair that overlaps, if any."""
    held = list(held)
    for want in wanted:
        for have in held:
            if overlap(want, have):
                return want, have
    return None


def self_overlap(ports: Iterable[PortMapping]) -> tuple[PortMapping, PortMapping] | None:
    """Two mappings of one request that take the same host port."""
    seen: list[PortMapping] = []
    for port in ports:
        for earlier in seen:
            if overlap(port, earlier):
                return earlier, port
        seen.append(port)
    return None
