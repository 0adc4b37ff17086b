"""Snapshot templates for the QEMU drivers: snapshot a running replica, restore clones.

One flow for both QEMU drivers (microVM and full VM); each supplies its facts
(what a restore must match, :mod:`.snapshot`), and the full VM the disk files a
template carries. The mechanics (QMP, the RAM copy) are in :mod:`.snapshot_io`.

Why the template is a *copy* of the source's RAM: the first ready replica of
a revision becomes the template and must keep serving, and clones map the
template privately, so it must never change under them. The copy is made
while the source is paused (its device state and its RAM then agree); only
the pages the guest touched are copied (the file is sparse), ~100 MB for the
iris unikernel, so the pause is ~0.1-0.2 s, taken only while it is idle.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

from uniframe.errors import RuntimeDriverError
from uniframe.runtime.qemu.microvm import (
    QEMU_LOG,
    QMP_SOCK,
    GuestMemory,
    QemuDriver,
    QemuRecord,
    own_ram_file,
    qemu_log_tail,
)
from uniframe.runtime.qemu.qmp import Qmp
from uniframe.runtime.qemu.snapshot import (
    RAM_FILE,
    STATE_FILE,
    Fact,
    SnapshotNotFoundError,
    SnapshotStore,
    StoredSnapshot,
    differences,
    facts_key,
    snapshot_store,
)
from uniframe.runtime.qemu.snapshot_io import (
    allocated_bytes,
    copy_sparse,
    load_devices,
    open_connections,
    save_devices,
)
from uniframe.runtime.replica import Replica, ReplicaConfig, utcnow
from uniframe.runtime.snapshot import Snapshot, SnapshotMismatchError


class SnapshotTemplates(QemuDriver):
    """A QEMU driver whose replicas can become templates and be restored as clones."""

    def __init__(self, root: Path | None = None) -> None:
        super().__init__(root)
        # replica id -> the snapshot its next launch loads (set by restore only, so a later
        # start of the same replica boots it afresh)
        self._incoming: dict[str, StoredSnapshot] = {}

    @property
    def snapshots(self) -> SnapshotStore:
        """This host's snapshot templates, ``<state>/snapshots/``."""
        return snapshot_store(self.root.parent)

    def _facts_for(self, config: ReplicaConfig) -> dict[str, Fact]:
        """The snapshot facts of a replica that would be restored with ``config``."""
        raise NotImplementedError

    def _replica_facts(self, replica: Replica) -> dict[str, Fact]:
        """The snapshot facts of a running replica (its launched command line)."""
        raise NotImplementedError

    def _template_files(self, replica: Replica) -> dict[str, Path]:
        """Files besides RAM a template needs, copied while the guest is paused (name -> file)."""
        return {}

    def _prepare_clone(self, replica: Replica, stored: StoredSnapshot) -> None:
        """Make a created clone's files the template's before it launches (e.g. its disk)."""
        return None

    def _guest_memory(self, replica: Replica) -> tuple[GuestMemory | None, StoredSnapshot | None]:
        """The RAM a launch uses, and the snapshot it loads if it is a restore.

        A clone (only ever launched by :meth:`restore`) maps the template's
        RAM privately; a snapshottable replica gets a fresh shared file of its
        own; any other, anonymous memory. A later start of a clone boots it.
        """
        pending = self._incoming.pop(replica.id, None)
        if pending is not None:
            return GuestMemory(pending.ram, shared=False), pending
        if replica.config.snapshottable:
            memory = GuestMemory(own_ram_file(replica.id), shared=True)
            memory.path.unlink(missing_ok=True)  # a fresh boot starts from zeroed RAM
            return memory, None
        return None, None

    @staticmethod
    def _release_ram(replica: Replica) -> None:
        """The replica's own RAM file; never a template a clone maps."""
        record = QemuRecord.of(replica)
        if record.ram_file is not None and record.restored_from is None:
            Path(record.ram_file).unlink(missing_ok=True)

    def snapshot(self, ref: str) -> Snapshot:
        """Save a running, idle replica as a template; the replica keeps running.

        The guest is paused (``stop``), its device state is saved without its
        RAM (``x-ignore-shared``), its RAM file is copied into the snapshot,
        and it continues (``cont``): the pause is the save plus the copy of the
        pages the guest has touched. The copy, not the replica's own file, is
        the template, so the replica serves on and clones never see its later
        writes. The replica must have been started ``snapshottable`` (RAM in a
        shared file) and have no connection open on its published ports
        (user-mode networking cannot carry one across a restore).
        """
        replica = self.get(ref)
        record = QemuRecord.of(replica)
        if not self._alive(replica):
            raise RuntimeDriverError(f"replica {replica.name} is not running; start it, and "
                                     "snapshot it once it has served a warm-up request")
        if record.restored_from is not None:
            raise RuntimeDriverError(
                f"replica {replica.name} was restored from snapshot {record.restored_from}; "
                "its RAM is a private copy of that template, which stays the snapshot to use")
        if record.ram_file is None or not replica.config.snapshottable:
            raise RuntimeDriverError(
                f"replica {replica.name} keeps its RAM in anonymous memory; only a replica "
                "created snapshottable (RAM in a shared file, no free page reporting) can be "
                "snapshotted: create it with snapshottable=True")
        busy = open_connections(replica.pid or 0, {p.host_port for p in replica.config.ports})
        if busy:
            raise RuntimeDriverError(
                f"replica {replica.name} has {busy} TCP connection(s) open on its published "
                "ports; a restored clone could not carry them: snapshot it when it is idle")
        facts = self._replica_facts(replica)
        snapshot_id = secrets.token_hex(6)
        store = self.snapshots
        directory = store.new_dir(snapshot_id)
        qmp = Qmp(replica.dir / QMP_SOCK, timeout=5.0)
        ram_tmp = directory / (RAM_FILE + ".tmp")
        try:
            paused = time.monotonic()
            qmp.execute("stop")
            try:
                save_devices(qmp, directory / STATE_FILE)
                saved = time.monotonic()
                copied = copy_sparse(Path(record.ram_file), ram_tmp)
                for name, path in self._template_files(replica).items():
                    copy_sparse(path, directory / name)
            finally:
                qmp.execute("cont")
            resumed = time.monotonic()
            with ram_tmp.open("rb+") as fh:  # durable before it is called a snapshot
                os.fsync(fh.fileno())
            ram_tmp.chmod(0o444)  # clones map it privately; nothing may change it
            os.replace(ram_tmp, directory / RAM_FILE)
        except BaseException:
            store.discard(directory)
            raise
        state_bytes = (directory / STATE_FILE).stat().st_size
        snap = Snapshot(id=snapshot_id, driver=self.kind, source_replica=replica.id,
                        image_digest=replica.config.image.digest, created_at=utcnow(),
                        location=str(directory), valid_for=facts_key(facts),
                        size_bytes=state_bytes + allocated_bytes(directory / RAM_FILE))
        stats = {"pause_ms": round((resumed - paused) * 1000, 1),
                 "save_ms": round((saved - paused) * 1000, 1), "state_bytes": state_bytes,
                 "ram_copied_bytes": copied, "memory_mib": replica.config.memory_mib}
        store.save(StoredSnapshot(snap, directory, dict(facts), stats))
        return snap

    def restore(self, snapshot: Snapshot, config: ReplicaConfig) -> Replica:
        """A new replica from ``snapshot``, running once this returns (and not before).

        QEMU starts with the same command line the template ran with plus
        ``-incoming defer`` over the template's RAM (private, copy-on-write);
        the device state is loaded over QMP, the guest continued, and then
        :meth:`_before_serving` runs. Only after that is the replica started:
        the caller must route no request to it earlier. A snapshot not valid
        for ``config`` is a :class:`SnapshotMismatchError` naming what differs;
        any other failure removes the half-made replica and raises, so the
        caller can boot one instead.
        """
        wanted = self._facts_for(config)
        try:
            snapshot.check(self.kind, facts_key(wanted))
        except SnapshotMismatchError as exc:
            saved = self._stored(snapshot).facts if snapshot.driver == self.kind else {}
            what = differences(saved, wanted) if saved else []
            raise SnapshotMismatchError(f"{exc}" + (f"; what differs: {'; '.join(what)}" if what else "")) from None
        stored = self._stored(snapshot)
        if not (stored.state.is_file() and stored.ram.is_file()):
            raise RuntimeDriverError(f"snapshot {snapshot.id} in {stored.dir} lacks its state or RAM "
                                     "file; remove it ('uniframe snapshot rm') and take a new one")
        replica = self.create(config)
        try:
            self._prepare_clone(replica, stored)
            self._incoming[replica.id] = stored
            replica = self.start(replica.id)
            qmp = Qmp(replica.dir / QMP_SOCK, timeout=5.0)
            load_devices(qmp, stored.state)
            qmp.execute("cont")
            self._before_serving(replica)
        except BaseException as exc:
            self._incoming.pop(replica.id, None)
            died = not self._alive(replica)  # QEMU exits when it cannot load a state
            tail = "; ".join(qemu_log_tail(replica.dir / QEMU_LOG, 3).splitlines())
            with contextlib.suppress(Exception):
                self.remove(replica.id, force=True)
            if isinstance(exc, Exception):
                cause = f"QEMU exited: {tail}" if died and tail else str(exc)
                raise RuntimeDriverError(f"restoring snapshot {snapshot.id} failed ({cause}); "
                                         "boot a replica instead") from exc
            raise
        return replica

    def remove_snapshot(self, snapshot: Snapshot) -> None:
        """Delete a template's files (see :meth:`SnapshotStore.remove`: clones keep their RAM)."""
        with contextlib.suppress(SnapshotNotFoundError):
            self.snapshots.remove(snapshot.id)

    def _stored(self, snapshot: Snapshot) -> StoredSnapshot:
        """The store's copy of ``snapshot`` (where its files are)."""
        try:
            return self.snapshots.get(snapshot.id)
        except SnapshotNotFoundError:
            # taken under another state root: its record says where its files are
            with contextlib.suppress(OSError, ValueError, KeyError):
                found = SnapshotStore.load(Path(snapshot.location))
                if found.snapshot.id == snapshot.id:
                    return found
            raise RuntimeDriverError(
                f"snapshot {snapshot.id} is not in {self.snapshots.root} (removed?); take a new "
                "one, or boot a replica instead") from None

    def _before_serving(self, replica: Replica) -> None:
        """Runs after a restored clone continued and before anyone may route to it: the
        place to give a clone its own identity, entropy and clock (none yet)."""
        return None
