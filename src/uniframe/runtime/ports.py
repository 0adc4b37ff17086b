"""Published ports: ``-p [IP:]HOST:GUEST[/tcp]`` and the check that HOST is free.

QEMU's user-mode network reports a taken port as a vague "could not set up
host forwarding rule" after it has started; binding the port ourselves first
lets the user hear which port is taken, before anything is launched. That
check sees only sockets: ports other replicas publish (some through DNAT,
which binds nothing) are claimed in :mod:`uniframe.runtime.hostnet`, whose
claim runs this check too, under its lock.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any

from uniframe.errors import RuntimeDriverError


class PortInUseError(RuntimeDriverError):
    """A host port asked for with ``-p`` is already bound by someone else."""


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    guest_port: int
    host_ip: str = "127.0.0.1"
    protocol: str = "tcp"

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.guest_port}/{self.protocol}"

    def to_json(self) -> dict[str, Any]:
        return {"host_ip": self.host_ip, "host_port": self.host_port,
                "guest_port": self.guest_port, "protocol": self.protocol}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PortMapping:
        return cls(int(data["host_port"]), int(data["guest_port"]),
                   str(data.get("host_ip", "127.0.0.1")), str(data.get("protocol", "tcp")))


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise RuntimeDriverError(
            f"port mapping {spec!r}: {text!r} is not a port (1-65535); use HOST:GUEST, e.g. 8080:8080"
        )
    return int(text)


def parse_port_mapping(spec: str) -> PortMapping:
    """``8080:80``, ``0.0.0.0:8080:80`` or ``8080:80/tcp`` (only TCP is forwarded)."""
    body, _, protocol = spec.partition("/")
    if protocol not in ("", "tcp"):
        raise RuntimeDriverError(f"port mapping {spec!r}: only tcp ports can be published")
    parts = body.rsplit(":", 2)
    if len(parts) == 2:
        return PortMapping(_port(parts[0], spec), _port(parts[1], spec))
    if len(parts) == 3 and parts[0]:
        return PortMapping(_port(parts[1], spec), _port(parts[2], spec), host_ip=parts[0])
    raise RuntimeDriverError(f"port mapping {spec!r}: use HOST:GUEST or IP:HOST:GUEST, e.g. 8080:8080")


def ensure_free(ports: list[PortMapping]) -> None:
    """Raise :class:`PortInUseError` naming the first published port that cannot be bound."""
    seen: set[tuple[str, int]] = set()
    for mapping in ports:
        key = (mapping.host_ip, mapping.host_port)
        if key in seen:
            raise PortInUseError(f"host port {mapping.host_port} is published twice; give each -p its own host port")
        seen.add(key)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # QEMU binds with SO_REUSEADDR too, so a port in TIME_WAIT is not "taken".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((mapping.host_ip, mapping.host_port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(
                        f"host port {mapping.host_ip}:{mapping.host_port} is already in use; "
                        f"pick another with -p OTHER:{mapping.guest_port}, or stop what listens there "
                        f"(ss -ltnp 'sport = :{mapping.host_port}')"
                    ) from None
                raise RuntimeDriverError(
                    f"cannot publish {mapping.host_ip}:{mapping.host_port}: {exc.strerror}"
                ) from None
