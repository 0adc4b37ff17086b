"""A saved replica: what a driver's ``snapshot`` returns and its ``restore`` takes back.

Scale-to-zero keeps a service's replica as a snapshot and restores it on the
next request (a QEMU microVM restored from a migration snapshot answered in
0.65 s where a cold boot took 11 s), so the control plane must be able to hold
a snapshot in its store without knowing how a driver makes one. A
:class:`Snapshot` is therefore a plain record that round-trips through JSON:
which driver made it, from which replica and image, where its bytes live, and
a ``valid_for`` key.

The key is what makes restoring safe: a QEMU snapshot is only good for the
same image, machine shape (CPUs, memory), accelerator and QEMU build; loaded
into anything else it fails late or, worse, runs corrupted. Each driver folds
the facts its snapshots depend on into one digest with :func:`validity_key`,
and its ``restore`` refuses a snapshot whose key differs from the one the new
replica's config gives, naming what to do (take a new snapshot).

Drivers without snapshots inherit :meth:`uniframe.runtime.driver.Driver.snapshot`,
which refuses with the driver's name; the ``snapshot`` capability says the
same thing up front, so callers ask before trying.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from uniframe.errors import RuntimeDriverError

__all__ = ["Snapshot", "SnapshotMismatchError", "validity_key"]


class SnapshotMismatchError(RuntimeDriverError):
    """A snapshot handed to a driver (or a config) it is not valid for."""


def validity_key(**facts: str | int | float | None) -> str:
    """One digest of the facts a snapshot depends on (image digest, CPUs, memory, ...).

    Order of the keyword arguments does not matter; a fact that is None is
    kept as None, so "no accelerator recorded" never equals "tcg".
    """
    text = json.dumps(facts, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """One snapshot of one replica.

    ``location`` is where the driver keeps the bytes: a path on this host for
    QEMU, ``memory:`` for the in-memory fake. Only the driver that made it
    reads it.
    """

    id: str
    driver: str           # the driver kind that made it and alone can restore it
    source_replica: str   # the replica it was taken from
    image_digest: str     # the image that replica ran
    created_at: str
    location: str
    valid_for: str        # validity_key(...) of what a restore must match
    size_bytes: int | None = None

    def check(self, driver: str, valid_for: str) -> None:
        """Refuse, naming the difference, if this snapshot cannot be restored as asked."""
        if driver != self.driver:
            raise SnapshotMismatchError(
                f"snapshot {self.id} was taken by the {self.driver} driver and only it can "
                f"restore it, not {driver}; take a new snapshot with {driver}")
        if valid_for != self.valid_for:
            raise SnapshotMismatchError(
                f"snapshot {self.id} of replica {self.source_replica} is not valid for this "
                f"config (image, CPUs, memory or the {self.driver} driver's own settings "
                f"differ: {self.valid_for} != {valid_for}); restore it with the config it "
                "was taken with, or take a new snapshot")

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "driver": self.driver, "source_replica": self.source_replica,
                "image_digest": self.image_digest, "created_at": self.created_at,
                "location": self.location, "valid_for": self.valid_for,
                "size_bytes": self.size_bytes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        size = data.get("size_bytes")
        return cls(id=str(data["id"]), driver=str(data["driver"]),
                   source_replica=str(data["source_replica"]),
                   image_digest=str(data["image_digest"]), created_at=str(data["created_at"]),
                   location=str(data["location"]), valid_for=str(data["valid_for"]),
                   size_bytes=int(size) if size is not None else None)
