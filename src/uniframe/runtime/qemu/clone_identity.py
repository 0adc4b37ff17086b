"""The host's half of a restored clone's uniqueness: its seed, clock and name, acknowledged.

Clones of one snapshot template share the template's kernel CRNG state,
Python random state, hostname and a wall clock stopped at the snapshot. Before
a clone serves, the driver types a :class:`~uniframe.guest.clone.CloneMessage`
on its serial console (fresh random seed, the host's wall clock, the replica
id and a hostname of its own) and waits, bounded, for the guest init's
acknowledgement, which carries what the guest now sees (its hostname, wall
clock and a UUID drawn from its reseeded CRNG). No acknowledgement in time
means the clone is not unique: the restore fails, and the caller boots instead.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from uniframe.errors import RuntimeDriverError
from uniframe.guest.clone import ACK, CloneMessage

# Under TCG a just-continued guest takes ~0.1 s to run its console thread; leave room.
ACK_TIMEOUT = 10.0
SEED_BYTES = 64
_REFUSED = re.compile(rb"cannot become a clone \(([^\n]*)\)")
_ACK_FIELDS = re.compile(rb"(\w+)=(\S+)")


@dataclass(frozen=True)
class CloneAck:
    """What the guest reported once it had its own identity."""

    nonce: str
    hostname: str
    time_ns: int
    uuid: str
    took_ms: float


def clone_hostname(name: str) -> str:
    """A valid hostname (RFC 1123 label, at most 63 characters) from a replica's name."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].rstrip("-")
    return label or "uniframe"


def parse_ack(text: bytes, nonce: str) -> CloneAck | None:
    """The acknowledgement for ``nonce`` in console output, if it is there yet."""
    marker = f"{ACK} nonce={nonce} ".encode()
    start = text.find(marker)
    if start < 0:
        return None
    end = text.find(b"\n", start)
    if end < 0:
        return None
    fields = {k.decode(): v.decode(errors="replace")
              for k, v in _ACK_FIELDS.findall(text[start + len(ACK):end])}
    try:
        return CloneAck(nonce, fields["hostname"], int(fields["time_ns"]), fields["uuid"],
                        float(fields["took_ms"]))
    except (KeyError, ValueError):
        raise RuntimeDriverError(
            f"the guest's clone acknowledgement is malformed: {text[start:end]!r}; "
            "rebuild the image with this uniframe's guest init") from None


def give_identity(console: Path, replica_id: str, name: str,
                  timeout: float = ACK_TIMEOUT) -> CloneAck:
    """Type the clone message on ``console`` (QEMU's console socket); wait for its acknowledgement."""
    nonce = secrets.token_hex(8)
    seen = b""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(str(console))
        msg = CloneMessage(replica_id, clone_hostname(name), time.time_ns(),
                           secrets.token_bytes(SEED_BYTES), nonce)
        sock.sendall(msg.line())
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            seen = (seen + chunk)[-65536:]
            ack = parse_ack(seen, nonce)
            if ack is not None:
                return ack
            refused = _REFUSED.search(seen)
            if refused:
                raise RuntimeDriverError(
                    f"the restored guest refused its clone identity ({refused.group(1).decode(errors='replace')})")
    raise RuntimeDriverError(
        f"the restored guest did not acknowledge its clone identity within {timeout:g} s "
        "(an image built before clone support has no reader for it: rebuild the image)")
