"""Which replica gets the next request: least outstanding requests, split by version weights.

Least outstanding requests (not round robin) because inference time varies
with the replica's runtime and load: a replica that answers slowly keeps
more requests in flight and so gets fewer new ones, without any timing
measurements. Ties (the common case at low load) rotate, so idle replicas
share the work evenly and all stay warm.

Rollouts split traffic by version: backends carry a group (the model or
image version) and each group a weight. With weights set, a request first
picks a group by smooth weighted round robin (the nginx algorithm: exact
proportions over every window of ``sum(weights)`` requests, no randomness,
so a 90/10 canary is 90/10 from the start), then the least loaded backend in
it. A group with no eligible backend drops out and its share goes to the
others; a group without a weight gets none, so a new version takes no traffic
until the rollout gives it some. Without weights all backends form one pool.
"""

from __future__ import annotations

import socket
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uniframe.control.proxy.server import Upstream


class BackendState:
    """One replica as the proxy sees it: address, group, health and the work it carries now."""

    __slots__ = (
        "addr", "checking", "draining", "failures", "family", "group", "healthy", "host", "id",
        "idle", "last_error", "next_check", "outstanding", "port", "ready", "removed", "requests",
    )

    def __init__(self, id: str, host: str, port: int, group: str = "default", ready: bool = True) -> None:
        self.id = id
        self.host = host
        self.port = port
        self.group = group
        self.ready = ready  # the reconciler's word
        self.healthy = True  # ours: passive (failed connections) and active (/v2/health/ready) checks
        self.draining = False  # no new requests; in-flight ones finish
        self.removed = False  # dropped from the set: close its connections as they come free
        self.outstanding = 0
        self.requests = 0
        self.failures = 0
        self.last_error = ""
        self.idle: list[Upstream] = []  # keep-alive connections ready for the next request
        self.checking = False
        self.next_check = 0.0
        self.family, self.addr = resolve(host, port)

    @property
    def eligible(self) -> bool:
        return self.ready and self.healthy and not self.draining and not self.removed

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id, "host": self.host, "port": self.port, "group": self.group,
            "ready": self.ready, "healthy": self.healthy, "draining": self.draining,
            "outstanding": self.outstanding, "requests": self.requests, "failures": self.failures,
            "last_error": self.last_error,
        }


def resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """Resolve once, when the backend is added: a name lookup per connection would stall the loop."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve backend host {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    return family, addr


class _Group:
    __slots__ = ("current", "members", "name", "weight")

    def __init__(self, name: str, weight: int) -> None:
        self.name = name
        self.weight = weight
        self.current = 0
        self.members: list[BackendState] = []


class Balancer:
    """The backend set and the choice among it; call :meth:`rebuild` after any state change."""

    def __init__(self) -> None:
        self.backends: dict[str, BackendState] = {}
        self.weights: dict[str, int] = {}
        self._eligible: list[BackendState] = []
        self._groups: dict[str, _Group] = {}
        self._rr = 0

    def rebuild(self) -> None:
        """Recompute the eligible sets: health and membership change rarely, requests often."""
        self._eligible = [b for b in self.backends.values() if b.eligible]
        old = self._groups
        self._groups = {}
        for name, weight in self.weights.items():
            group = _Group(name, weight)
            if name in old:
                group.current = old[name].current
            self._groups[name] = group
        for b in self._eligible:
            g = self._groups.get(b.group)
            if g is not None:
                g.members.append(b)

    @property
    def eligible(self) -> list[BackendState]:
        return self._eligible

    def has_eligible(self) -> bool:
        if not self.weights:
            return bool(self._eligible)
        return any(g.weight > 0 and g.members for g in self._groups.values())

    def pick(self, exclude: Collection[str] = ()) -> BackendState | None:
        """The backend for the next request, avoiding ``exclude`` (backends that failed it)."""
        members = self._pick_group(exclude) if self.weights else self._eligible
        n = len(members)
        if n == 0:
            return None
        if n == 1:
            b = members[0]
            return None if b.id in exclude else b
        start = self._rr % n
        self._rr += 1
        best: BackendState | None = None
        best_out = 1 << 62
        for i in range(n):
            b = members[(start + i) % n]
            if b.outstanding < best_out and b.id not in exclude:
                best, best_out = b, b.outstanding
                if best_out == 0:
                    break
        return best

    def _pick_group(self, exclude: Collection[str]) -> list[BackendState]:
        chosen: _Group | None = None
        total = 0
        for g in self._groups.values():
            if g.weight <= 0 or not g.members:
                continue
            if exclude and all(b.id in exclude for b in g.members):
                continue
            g.current += g.weight
            total += g.weight
            if chosen is None or g.current > chosen.current:
                chosen = g
        if chosen is None:
            return []
        chosen.current -= total
        return chosen.members
