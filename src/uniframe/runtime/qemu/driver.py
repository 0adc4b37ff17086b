"""The QEMU ``-M microvm`` driver: unikernel images as detached microVMs.

Each replica is a directory ``<state>/replicas/<id>/``::

    replica.json   what was asked for and what was launched (pid + start time, argv, ports)
    qemu.log       QEMU's own stdout/stderr
    console.log    the guest's serial console, complete from the first byte
    console.sock   the console's input: ``stop`` types ``uniframe:shutdown`` here
    qmp.sock       QMP, for ``quit`` when the guest does not shut down in time
    exit.json      how the replica ended, once someone has seen it end (runtime.driver)

A new process rebuilds everything from these files; nothing lives only in
memory. QEMU runs in its own session so the CLI can exit (or be interrupted)
without touching it.

Stopping is gentle first: microvm has no ACPI power button, so the guest init
reads ``uniframe:shutdown`` from its console, stops the app, prints
``UNIFRAME-EXIT status=N`` and reboots (QEMU runs with ``-no-reboot``, so it
exits). Only if that does not happen in time does the driver send QMP ``quit``,
then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from uniframe.errors import RuntimeDriverError
from uniframe.runtime import hostnet
from uniframe.runtime.driver import REPLICA_FILE, STATUS_FILE
from uniframe.runtime.qemu import network as network
from uniframe.runtime.qemu.accel import choose_accel
from uniframe.runtime.qemu.binary import qemu_binary
from uniframe.runtime.qemu.microvm import (
    CONSOLE_LOG,
    CONSOLE_SOCK,
    QEMU_LOG,
    QMP_SOCK,
    USER_NET_GUEST_IP,
    USER_NET_IP_ARG,
    GuestMemory,
    MicroVM,
    QemuDriver,
    QemuRecord,
    console_chardev,
    kernel_cmdline,
    launch_detached,
    own_ram_file,
    qemu_log_tail,
    user_netdev,
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
    snapshot_facts,
    snapshot_store,
)
from uniframe.runtime.qemu.snapshot_io import (
    allocated_bytes,
    copy_sparse,
    load_devices,
    open_connections,
    save_devices,
)
from uniframe.runtime.replica import Replica, ReplicaConfig, ReplicaState, ReplicaStatus, utcnow
from uniframe.runtime.snapshot import Snapshot, SnapshotMismatchError

__all__ = ["CONSOLE_LOG", "EXIT_FILE", "QMP_SOCK", "REPLICA_FILE", "QemuMicroVMDriver"]

EXIT_FILE = STATUS_FILE
EXIT_LINE = re.compile(rb"UNIFRAME-EXIT status=(-?\d+)")
SHUTDOWN_LINE = b"uniframe:shutdown\n"


class QemuMicroVMDriver(QemuDriver):
    """Create, start, stop, inspect and remove microVM replicas on this host."""

    noun = "microVM replica"
    kind = "qemu-microvm"
    stop_verb = "shut down"

    def create(self, config: ReplicaConfig) -> Replica:
        """Record a new replica on disk; :meth:`start` boots it."""
        if config.network not in ("user", "bridge"):
            raise RuntimeDriverError(f"unknown network mode {config.network!r}; use user or bridge")
        if config.cpus < 1 or config.memory_mib < 16:
            raise RuntimeDriverError(f"a microVM needs at least 1 CPU and 16Mi of memory (got {config.cpus} CPUs, {config.memory_mib}Mi)")
        image = config.image
        for path in (image.kernel, image.disk if image.disk is not None else image.initrd):
            if not path.is_file():
                raise RuntimeDriverError(f"image {config.image.ref}: {path} is missing; rebuild the image")
        replica_id, name, directory = self._allocate(config.name, Path(config.image.ref.split(":")[0]).name,
                                                     longest=CONSOLE_SOCK)
        return self._record_new(replica_id, directory, replace(config, name=name))

    def __init__(self, root: Path | None = None) -> None:
        super().__init__(root)
        # replica id -> the snapshot its next launch loads (set by restore only, so a later
        # start of the same replica boots it afresh)
        self._incoming: dict[str, StoredSnapshot] = {}

    @staticmethod
    def _vm(config: ReplicaConfig, directory: Path, accel: str, netdev: str, ip_arg: str,
            memory: GuestMemory | None, incoming: bool = False) -> MicroVM:
        """The machine for ``config``; one place, so a restore's key and its launch agree."""
        return MicroVM(
            qemu=qemu_binary(), kernel=config.image.kernel, disk=config.image.disk,
            initrd=config.image.initrd if config.image.disk is None else None,
            cmdline=kernel_cmdline(config.image.cmdline, [ip_arg]),
            cpus=config.cpus, memory_mib=config.memory_mib, accel=accel,
            netdev=(netdev,), serial=console_chardev(directory / CONSOLE_SOCK, directory / CONSOLE_LOG),
            qmp_socket=directory / QMP_SOCK, memory=memory, incoming=incoming,
        )

    def _launch(self, replica: Replica) -> tuple[Replica, subprocess.Popen[bytes]]:
        """QEMU with the replica's kernel and root, its network attached first.

        A replica restored from a snapshot waits for its device state
        (``-incoming defer``) over the template's RAM, mapped privately; a
        snapshottable one keeps its RAM in a shared file of its own
        (:func:`own_ram_file`); any other, in anonymous memory.
        """
        config = replica.config
        accel = choose_accel(config.accel, kernel=config.image.kernel)
        guest_ip, tap, netdev, ip_arg = self._network(replica)
        pending = self._incoming.pop(replica.id, None)
        if pending is not None:
            memory: GuestMemory | None = GuestMemory(pending.ram, shared=False)
        elif config.snapshottable:
            memory = GuestMemory(own_ram_file(replica.id), shared=True)
        else:
            memory = None
        record = QemuRecord(accel.name, guest_ip, tap,
                            ram_file=str(memory.path) if memory is not None else None,
                            restored_from=pending.snapshot.id if pending is not None else None)
        try:
            for name in (CONSOLE_SOCK, QMP_SOCK):
                (replica.dir / name).unlink(missing_ok=True)
            if memory is not None and memory.shared:
                memory.path.unlink(missing_ok=True)  # a fresh boot starts from zeroed RAM
            vm = self._vm(config, replica.dir, accel.name, netdev, ip_arg, memory,
                          incoming=pending is not None)
            argv = vm.argv()
            proc = launch_detached(argv, replica.dir, replica.dir / QEMU_LOG)
        except BaseException:
            self._release(record.on(replica))
            raise
        return record.on(replica.with_(argv=tuple(argv))), proc

    def _network(self, replica: Replica) -> tuple[str, str | None, str, str]:
        """(guest IP, tap name, -netdev value, ip= kernel argument) for the replica."""
        config = replica.config
        if config.network == "user":
            hostnet.claim_ports(self.root.parent, replica, config.ports)  # hostfwd binds them
            ports = [(p.host_ip, p.host_port, p.guest_port) for p in config.ports]
            return USER_NET_GUEST_IP, None, user_netdev(ports), USER_NET_IP_ARG
        attachment = network.attach(self.root.parent, replica)
        return attachment.guest_ip, attachment.tap, attachment.netdev, attachment.ip_arg

    def _how_it_ended(self, replica: Replica) -> ReplicaStatus:
        """The status the guest printed on its console for this run, or crashed if it printed none."""
        matches = EXIT_LINE.findall(self._console(replica))
        if matches:
            return ReplicaStatus(ReplicaState.EXITED, int(matches[-1]), "the guest exited")
        tail = qemu_log_tail(replica.dir / QEMU_LOG, 2)
        return ReplicaStatus(ReplicaState.CRASHED, None,
                             "the VM stopped without an exit status from the guest"
                             + (f": {tail}" if tail else ""))

    def _type_on_console(self, replica: Replica, data: bytes, until: float) -> None:
        """Type ``data`` on the guest's serial console, staying connected until ``until`` (monotonic).

        QEMU's UART takes input only as fast as the guest drains its FIFO and
        drops what is still unread when the client hangs up, so the connection
        stays open (its copy of the console output read and discarded) until
        the replica stops or ``until`` passes.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(str(replica.dir / CONSOLE_SOCK))
            sock.sendall(data)
            sock.setblocking(False)
            while self._alive(replica) and time.monotonic() < until:
                with contextlib.suppress(BlockingIOError):
                    if not sock.recv(65536):
                        return
                time.sleep(0.05)

    def send_console(self, ref: str, data: bytes, linger: float = 1.0) -> None:
        """Type ``data`` on the guest's serial console."""
        self._type_on_console(self.get(ref), data, time.monotonic() + linger)

    def _ask_to_stop(self, replica: Replica, deadline: float) -> None:
        """The shutdown line on the console: the guest init stops the app and reports its status."""
        with contextlib.suppress(OSError):  # no console to type on: the stop escalates
            self._type_on_console(replica, SHUTDOWN_LINE, deadline)

    def _release(self, replica: Replica) -> None:
        """A bridged replica's tap, address and port claims; its own RAM file (never a template)."""
        record = QemuRecord.of(replica)
        if replica.config.network == "bridge":
            network.detach(self.root.parent, replica.id, record.tap)
        else:
            super()._release(replica)
        if record.ram_file is not None and record.restored_from is None:
            Path(record.ram_file).unlink(missing_ok=True)

    # -- snapshots (runtime/qemu/snapshot.py: the key and the store; snapshot_io.py: QMP) ----

    @property
    def snapshots(self) -> SnapshotStore:
        """This host's snapshot templates, ``<state>/snapshots/``."""
        return snapshot_store(self.root.parent)

    def _facts_for(self, config: ReplicaConfig) -> dict[str, Fact]:
        """The snapshot facts of a replica that would be restored with ``config``."""
        if config.network != "user":
            raise RuntimeDriverError(
                f"snapshots need user-mode networking (a restored guest keeps the address it "
                f"booted with), not {config.network!r}; run the replica with --net user")
        accel = choose_accel(config.accel, kernel=config.image.kernel).name
        placeholder = Path("/<replica>")
        vm = self._vm(config, placeholder, accel, user_netdev([]), USER_NET_IP_ARG,
                      GuestMemory(placeholder / "ram", shared=False), incoming=True)
        return snapshot_facts(vm.argv(), replica_dir=placeholder, image=config.image,
                              accel=accel, network=config.network)

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
        facts = snapshot_facts(replica.argv, replica_dir=replica.dir, image=replica.config.image,
                               accel=record.accel, network=replica.config.network)
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
        self._incoming[replica.id] = stored
        try:
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

    def _stored(self, snapshot: Snapshot) -> StoredSnapshot:
        """The store's copy of ``snapshot`` (where its files are)."""
        try:
            return self.snapshots.get(snapshot.id)
        except SnapshotNotFoundError:
            raise RuntimeDriverError(
                f"snapshot {snapshot.id} is not in {self.snapshots.root} (removed?); take a new "
                "one, or boot a replica instead") from None

    def _before_serving(self, replica: Replica) -> None:
        """Runs after a restored clone continued and before anyone may route to it: the
        place to give a clone its own identity, entropy and clock (none yet)."""
        return None
