"""A restored clone's own entropy, clock and identity, given by the host before it serves.

Every clone of a snapshot template wakes with the template's RAM: the same
kernel CRNG state (so the same ``getrandom`` output, TCP initial sequence
numbers and ``uuid4``), the same Python ``random`` state, the template's
hostname and a wall clock stopped at the snapshot's time. ``-M microvm`` with
``acpi=off`` has no VMGenID to tell the kernel it was cloned, so the host says
so itself: right after ``cont`` it types one line on the serial console, which
the init already reads for ``uniframe:shutdown`` (:mod:`.stop`)::

    uniframe:clone id=REPLICA hostname=NAME time_ns=NS seed=HEX nonce=HEX

Why the serial console rather than a virtio-serial port: it is already there in
every template and every clone, already read by PID 1 in every image, and
needs no kernel driver or QEMU device that would change the snapshot's key.
The init turns off the console's echo (:mod:`.stop`), so the seed is not
copied into the console log.

:func:`apply` mixes the seed into the kernel's pool (``RNDADDENTROPY``) and
forces a CRNG reseed (``RNDRESEEDCRNG``), so every later ``getrandom`` in the
guest differs from the other clones'; sets the wall clock and the hostname;
exports the replica id; and reseeds Python's ``random`` (and numpy's global
generator if the app loaded ``numpy.random``) from the fresh CRNG. The app runs in this
very process (:mod:`.init` runs it with ``runpy``), so reseeding this
interpreter's modules reseeds the model server's. Then it answers on the
console with :data:`ACK`, which the host waits for before routing anything to
the clone.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import socket
import struct
import sys
import time
from dataclasses import dataclass

REQUEST = b"uniframe:clone"
ACK = "uniframe:clone-ok"
MIN_SEED_BYTES = 32
# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
REPLICA_ID_ENV = "UNIFRAME_REPLICA_ID"

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$")
_TOKEN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEX = re.compile(r"^(?:[0-9a-f]{2})+$")
_KEYS = ("id", "hostname", "time_ns", "seed", "nonce")


class CloneMessageError(ValueError):
    """A clone line is malformed; the message names the field."""


@dataclass(frozen=True)
class CloneMessage:
    """What the host tells a restored clone."""

    replica_id: str
    hostname: str
    time_ns: int
    seed: bytes
    nonce: str

    def line(self) -> bytes:
        """The console line carrying this message (the host writes it)."""
        return (f"{REQUEST.decode()} id={self.replica_id} hostname={self.hostname} "
                f"time_ns={self.time_ns} seed={self.seed.hex()} nonce={self.nonce}\n").encode()


def is_request(line: bytes) -> bool:
    words = line.split()
    return bool(words) and words[0] == REQUEST


def parse(line: bytes) -> CloneMessage:
    """The message in a clone line; :class:`CloneMessageError` says what is wrong."""
    words = line.decode("ascii", errors="replace").split()
    if not words or words[0] != REQUEST.decode():
        raise CloneMessageError(f"not a clone line (it must start with {REQUEST.decode()!r})")
    fields: dict[str, str] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or key not in _KEYS:
            raise CloneMessageError(f"unknown field {word!r}; expected {', '.join(_KEYS)}")
        if key in fields:
            raise CloneMessageError(f"field {key} given twice")
        fields[key] = value
    missing = [k for k in _KEYS if k not in fields]
    if missing:
        raise CloneMessageError(f"missing field(s) {', '.join(missing)}")
    for key in ("id", "nonce"):
        if not _TOKEN.match(fields[key]):
            raise CloneMessageError(f"{key}={fields[key]!r} must be 1-64 letters, digits, '_', '.' or '-'")
    if not _HOSTNAME.match(fields["hostname"]):
        raise CloneMessageError(f"hostname={fields['hostname']!r} is not a valid hostname")
    if not fields["time_ns"].isdigit():
        raise CloneMessageError(f"time_ns={fields['time_ns']!r} must be a non-negative integer")
    seed = fields["seed"]
    if not _HEX.match(seed) or len(seed) < 2 * MIN_SEED_BYTES:
        raise CloneMessageError(f"seed must be at least {MIN_SEED_BYTES} bytes in lowercase hex")
    return CloneMessage(fields["id"], fields["hostname"], int(fields["time_ns"]),
                        bytes.fromhex(seed), fields["nonce"])


def add_entropy(seed: bytes, device: str = "/dev/random") -> None:
    """Mix ``seed`` into the kernel's pool, credited in full, then reseed the CRNG from it."""
    fd = os.open(device, os.O_WRONLY)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def reseed_python() -> None:
    """Python's ``random`` and, if the app loaded it, numpy's global generator, from the CRNG.

    ``numpy.random`` is looked up, never imported: an image ships only the
    modules its app loads, and one that never used it has nothing to reseed.
    """
    random.seed(os.urandom(32))
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed(int.from_bytes(os.urandom(4), "little"))


def apply(msg: CloneMessage, machine: bool) -> str:
    """Make this guest the clone ``msg`` names; return the acknowledgement line.

    ``machine`` is False outside a VM (tests, a plain process): the kernel's
    pool, clock and hostname are the host's then and are left alone.
    """
    started = time.monotonic()
    if machine:
        add_entropy(msg.seed)
        time.clock_settime_ns(time.CLOCK_REALTIME, msg.time_ns)
        socket.sethostname(msg.hostname)
    os.environ[REPLICA_ID_ENV] = msg.replica_id
    reseed_python()
    took = (time.monotonic() - started) * 1000
    return (f"{ACK} nonce={msg.nonce} hostname={socket.gethostname()} "
            f"time_ns={time.time_ns()} uuid={_uuid()} took_ms={took:.1f}")


def _uuid() -> str:
    """A random UUID drawn from the kernel now: shows the host the CRNG differs per clone."""
    try:
        with open("/proc/sys/kernel/random/uuid") as f:
            return f.read().strip()
    except OSError:
        return "-"
