"""What a microVM snapshot depends on, and where snapshots live on this host.

A QEMU snapshot here is a *template*: the device state of a paused guest
(``state``, ~50 KB, saved with the ``x-ignore-shared`` capability) beside a
copy of its RAM file (``ram``), which clones map privately (copy-on-write).
Loading it into any other machine fails late or runs corrupted, so each
snapshot records the facts it depends on and :func:`snapshot_facts` computes
the same facts for a machine about to be restored:

- the QEMU build: its version line *and* the sha256 of the binary (a rebuilt
  package with the same version may lay out device state differently; cross-
  version restore is unsupported for microvm);
- the kernel (sha256 of the file) and the image digest;
- the QEMU command line, normalised (:func:`normalise_argv`): everything that
  differs between two replicas of one config by construction (the replica's
  directory, its sockets, forwarded host ports, the RAM file's path and
  sharing, ``-incoming``) is left out, everything else (machine, CPUs,
  memory, devices, kernel command line) must be equal;
- the accelerator and the CPU model (``-cpu host`` under KVM is this host's
  CPU, so its model name and flags count).

The digest of these facts is the snapshot's ``valid_for`` key
(:func:`uniframe.runtime.snapshot.validity_key`); the facts themselves are kept
too, so a refusal names what differs.

Layout, ``<state>/snapshots/<id>/``::

    snapshot.json   the Snapshot record, its facts and its measured figures
    state           the device state (a QEMU migration stream without RAM)
    ram             the guest RAM at the moment of the snapshot (sparse, read-only)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniframe.errors import RuntimeDriverError
from uniframe.paths import state_dir
from uniframe.runtime.qemu.binary import qemu_version
from uniframe.runtime.replica import ImageRef
from uniframe.runtime.snapshot import Snapshot, validity_key

SNAPSHOTS_DIR = "snapshots"
SNAPSHOT_FILE = "snapshot.json"
STATE_FILE = "state"
RAM_FILE = "ram"

Fact = str | int | float | None


class SnapshotNotFoundError(RuntimeDriverError):
    """No snapshot in the store answers to the id or prefix given."""


@functools.cache
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def file_sha256(path: Path | str) -> str:
    """The file's sha256, computed once per (path, size, mtime) in this process."""
    st = os.stat(path)
    return _sha256_of(str(path), st.st_size, st.st_mtime_ns)


def _option_value(word: str, key: str) -> str:
    """``word`` without the ``key=value`` item of a QEMU option list (``,,`` is an escaped comma)."""
    return re.sub(rf",{key}=(?:[^,]|,,)*", "", word)


def normalise_argv(argv: Sequence[str], *, replica_dir: Path | str, image: ImageRef) -> list[str]:
    """The command line with what differs between replicas of one config left out.

    The binary becomes ``<qemu>`` (its version and hash are facts of their
    own), the image's files ``<kernel>``, ``<initrd>``, ``<disk>`` (the image
    digest covers their content), the replica's directory ``<replica>``; the
    user network's ``hostfwd`` rules, the RAM file's ``mem-path`` and ``share``
    and ``-incoming`` go. A restored guest keeps the network identity it had
    (MAC, the ``ip=`` it booted with), so the rest of ``-netdev`` stays.
    """
    names = [(str(replica_dir), "<replica>")]
    for role, file in (("kernel", image.kernel), ("initrd", image.initrd), ("disk", image.disk)):
        if file is not None and str(file) not in ("", "."):
            names.append((str(file), f"<{role}>"))
    names.sort(key=lambda pair: -len(pair[0]))  # a longer path first: the directory may hold the files
    out: list[str] = []
    skip = False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if i == 0:
            out.append("<qemu>")
            continue
        if word == "-incoming":
            skip = True
            continue
        previous = argv[i - 1]
        if previous == "-netdev" and word.startswith("user"):
            word = _option_value(word, "hostfwd")
        if previous == "-object" and word.startswith("memory-backend-file"):
            word = _option_value(_option_value(word, "mem-path"), "share")
        for path, name in names:
            word = word.replace(path.replace(",", ",,"), name).replace(path, name)
        out.append(word)
    return out


def cpu_model(argv: Sequence[str]) -> str:
    """The ``-cpu`` model; for ``host`` (KVM), this host's CPU name and a digest of its flags."""
    model = next((argv[i + 1] for i, w in enumerate(argv[:-1]) if w == "-cpu"), "default")
    if model != "host":
        return model
    name, flags = "unknown", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.strip()
    return f"host ({name}; flags {hashlib.sha256(flags.encode()).hexdigest()[:16]})"


def snapshot_facts(argv: Sequence[str], *, replica_dir: Path | str, image: ImageRef,
                   accel: str | None, network: str, driver: str = "qemu-microvm",
                   more: dict[str, Fact] | None = None) -> dict[str, Fact]:
    """Everything a restore must match, for a machine launched (or about to be) with ``argv``;
    ``more``: a driver's own facts (a full VM's disk)."""
    qemu = argv[0]
    return {
        **(more or {}),
        "driver": driver,
        "qemu_version": qemu_version(qemu),
        "qemu_sha256": file_sha256(qemu),
        "kernel_sha256": file_sha256(image.kernel) if image.kernel.is_file() else None,
        "image": image.digest,
        "argv": json.dumps(normalise_argv(argv, replica_dir=replica_dir, image=image)),
        "accel": accel,
        "cpu": cpu_model(argv),
        "network": network,
    }


def facts_key(facts: dict[str, Fact]) -> str:
    return validity_key(**facts)


def differences(saved: dict[str, Any], wanted: dict[str, Fact]) -> list[str]:
    """What differs between a snapshot's facts and a machine's, in words."""
    found = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if a == b:
            continue
        if key == "argv" and isinstance(a, str) and isinstance(b, str):
            old, new = json.loads(a), json.loads(b)
            gone = [w for w in old if w not in new]
            added = [w for w in new if w not in old]
            found.append(f"QEMU arguments (snapshot has {gone or 'the same words'}, "
                         f"this machine {added or 'in another order'})")
        else:
            found.append(f"{key} ({_brief(a)} in the snapshot, {_brief(b)} here)")
    return found


def _brief(value: object, limit: int = 100) -> str:
    text = "not recorded" if value is None else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class StoredSnapshot:
    """A snapshot as the store keeps it: the record, its facts, its figures, its directory."""

    snapshot: Snapshot
    dir: Path
    facts: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def ram(self) -> Path:
        return self.dir / RAM_FILE

    def to_json(self) -> dict[str, Any]:
        return {**self.snapshot.to_json(), "facts": self.facts, "stats": self.stats}


class SnapshotStore:
    """The snapshots of one state root, ``<state>/snapshots/<id>/``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def new_dir(self, snapshot_id: str) -> Path:
        directory = self.root / snapshot_id
        directory.mkdir(parents=True)
        return directory

    def save(self, stored: StoredSnapshot) -> None:
        """Write the record last, atomically: a directory without it is no snapshot."""
        tmp = stored.dir / (SNAPSHOT_FILE + ".tmp")
        tmp.write_text(json.dumps(stored.to_json(), indent=2) + "\n")
        os.replace(tmp, stored.dir / SNAPSHOT_FILE)

    @staticmethod
    def load(directory: Path) -> StoredSnapshot:
        """The snapshot in ``directory`` (OSError, ValueError or KeyError if it is none)."""
        data = json.loads((directory / SNAPSHOT_FILE).read_text())
        return StoredSnapshot(Snapshot.from_json(data), directory, dict(data.get("facts", {})),
                              dict(data.get("stats", {})))

    def list(self) -> list[StoredSnapshot]:
        """Every complete snapshot, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            with contextlib.suppress(OSError, ValueError, KeyError):
                found.append(self.load(d))
        return sorted(found, key=lambda s: (s.snapshot.created_at, s.snapshot.id))

    def get(self, ref: str) -> StoredSnapshot:
        """A snapshot by id or unique id prefix."""
        snaps = self.list()
        exact = [s for s in snaps if s.snapshot.id == ref]
        hits = exact or [s for s in snaps if ref and s.snapshot.id.startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise SnapshotNotFoundError(f"snapshot id {ref!r} is ambiguous "
                                        f"({', '.join(s.snapshot.id for s in hits)}); give more characters")
        known = ", ".join(s.snapshot.id for s in snaps) or "none"
        raise SnapshotNotFoundError(f"no snapshot {ref!r} in {self.root}; snapshots: {known} "
                                    "(see 'uniframe snapshot ls')")

    def remove(self, ref: str) -> StoredSnapshot:
        """Delete a snapshot's files. Clones running from it keep their mapping of its RAM
        (the kernel holds the file until they exit); no new clone can be made from it."""
        stored = self.get(ref)
        shutil.rmtree(stored.dir)
        return stored

    def discard(self, directory: Path) -> None:
        """Drop a snapshot directory that was never completed."""
        shutil.rmtree(directory, ignore_errors=True)


def snapshot_store(state: Path | None = None) -> SnapshotStore:
    """The snapshot store of a state root (default: this user's, ``UNIFRAME_STATE``)."""
    return SnapshotStore((state or state_dir()) / SNAPSHOTS_DIR)
