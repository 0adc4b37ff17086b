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
import re
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
from uniframe.runtime.qemu.clone_identity import give_identity
from uniframe.runtime.qemu.microvm import (
    CONSOLE_LOG,
    CONSOLE_SOCK,
    QEMU_LOG,
    QMP_SOCK,
    USER_NET_GUEST_IP,
    USER_NET_IP_ARG,
    GuestMemory,
    MicroVM,
    QemuRecord,
    console_chardev,
    kernel_cmdline,
    launch_detached,
    qemu_log_tail,
    user_netdev,
)
from uniframe.runtime.qemu.snapshot import Fact, snapshot_facts
from uniframe.runtime.qemu.snapshot_driver import SnapshotTemplates
from uniframe.runtime.replica import Replica, ReplicaConfig, ReplicaState, ReplicaStatus

__all__ = ["CONSOLE_LOG", "EXIT_FILE", "QMP_SOCK", "REPLICA_FILE", "QemuMicroVMDriver"]

EXIT_FILE = STATUS_FILE
EXIT_LINE = re.compile(rb"UNIFRAME-EXIT status=(-?\d+)")
SHUTDOWN_LINE = b"uniframe:shutdown\n"


class QemuMicroVMDriver(SnapshotTemplates):
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
        memory, pending = self._guest_memory(replica)
        record = QemuRecord(accel.name, guest_ip, tap,
                            ram_file=str(memory.path) if memory is not None else None,
                            restored_from=pending.snapshot.id if pending is not None else None)
        try:
            for name in (CONSOLE_SOCK, QMP_SOCK):
                (replica.dir / name).unlink(missing_ok=True)
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
        if replica.config.network == "bridge":
            network.detach(self.root.parent, replica.id, QemuRecord.of(replica).tap)
        else:
            super()._release(replica)
        self._release_ram(replica)

    # -- snapshots (the flow: runtime/qemu/snapshot_driver.py) ------------------------------

    def _before_serving(self, replica: Replica) -> None:
        """A clone gets fresh entropy, the wall clock and its own name from the guest init
        before it serves (:mod:`.clone_identity`); no acknowledgement fails the restore."""
        give_identity(replica.dir / CONSOLE_SOCK, replica.id, replica.name)

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
                              accel=accel, network=config.network, driver=self.kind)

    def _replica_facts(self, replica: Replica) -> dict[str, Fact]:
        return snapshot_facts(replica.argv, replica_dir=replica.dir, image=replica.config.image,
                              accel=QemuRecord.of(replica).accel, network=replica.config.network,
                              driver=self.kind)
