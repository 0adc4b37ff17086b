"""Loopback and hostname: the network basics nobody else sets up in a unikernel.

The kernel's ``ip=`` autoconfiguration brings up the NIC (and, when it runs,
``lo``), but a guest booted without ``ip=`` has ``lo`` down, and apps bind
and health-check on 127.0.0.1. There is no ``ip`` binary in the image, so
the interface flag is set with the same ``SIOCSIFFLAGS`` ioctl ``ip link set
lo up`` uses.
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
# struct ifreq on Linux: a 16-byte name, then a 24-byte union whose first
# member we use is ``short ifr_flags``.
_IFREQ = "16sH22x"


def interface_up(name: str = "lo") -> bool:
    """Set ``IFF_UP`` on an interface; True if it was down. Raises ``OSError``."""
    ifname = name.encode()
    if not 0 < len(ifname) < 16:
        raise ValueError(f"interface name {name!r} must be 1-15 bytes")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        got = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack(_IFREQ, ifname, 0))
        flags = struct.unpack(_IFREQ, got)[1]
        if flags & IFF_UP:
            return False
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack(_IFREQ, ifname, flags | IFF_UP))
    return True


def interface_is_up(name: str = "lo") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        got = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack(_IFREQ, name.encode(), 0))
    return bool(struct.unpack(_IFREQ, got)[1] & IFF_UP)


def set_hostname(name: str) -> None:
    socket.sethostname(name)


HOSTS_PATH = "/etc/hosts"


def hosts_text(hostname: str) -> str:
    """``/etc/hosts`` naming ``localhost`` and ``hostname``: glibc resolves both from it only.

    The init writes it at boot when the image has none; an image with a
    read-only root must ship it, so the image builder writes the same text.
    """
    return f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost\n"
