"""The QEMU ``-M microvm`` driver: unikernel images as detached microVMs.

Each replica is a directory ``<state>/replicas/<id>/``::

    replica.json   what was asked for and what was launched (pid + start time, argv, ports)
    qemu.log       QEMU's own stdout/stderr
    console.log    the guest's serial console, complete from the first byte
    console.sock   the console's input: ``stop`` types ``uniframe:shutdown`` here
    qmp.sock       QMP, for ``quit`` when the guest does not shut down in time
    exit.json      how the replica ended, once someone has seen it end

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
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from uniframe.errors import RuntimeDriverError
from uniframe.paths import state_dir
from uniframe.runtime.driver import Driver
from uniframe.runtime.ports import PortInUseError, ensure_free
from uniframe.runtime.process import ProcessRef, launched_alive
from uniframe.runtime.qemu import network as network
from uniframe.runtime.qemu.accel import choose_accel
from uniframe.runtime.qemu.binary import qemu_binary
from uniframe.runtime.qemu.microvm import (
    USER_NET_GUEST_IP,
    USER_NET_IP_ARG,
    MicroVM,
    console_chardev,
    kernel_cmdline,
    launch_detached,
    user_netdev,
)
from uniframe.runtime.qemu.qmp import Qmp, QmpError
from uniframe.runtime.replica import Replica, ReplicaConfig, ReplicaState, ReplicaStatus, utcnow

REPLICA_FILE = "replica.json"
EXIT_FILE = "exit.json"
CONSOLE_LOG = "console.log"
CONSOLE_SOCK = "console.sock"
QMP_SOCK = "qmp.sock"
QEMU_LOG = "qemu.log"

EXIT_LINE = re.compile(rb"UNIFRAME-EXIT status=(-?\d+)")
SHUTDOWN_LINE = b"uniframe:shutdown\n"
START_TIMEOUT_S = 15.0
_UNIX_PATH_MAX = 107


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(line for line in text.strip().splitlines()[-lines:] if not line.startswith("+ "))


class QemuMicroVMDriver(Driver):
    """Create, start, stop, inspect and remove microVM replicas on this host."""

    noun = "microVM replica"
    kind = "qemu-microvm"
    capabilities = frozenset({"port-forward", "bridge-network", "console", "logs"})

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir() / "replicas"
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- records on disk -------------------------------------------------

    # -- lifecycle ---------------------------------------------------------

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
        names = {r.name for r in self.list()}
        replica_id = secrets.token_hex(6)
        if config.name and config.name in names:
            raise RuntimeDriverError(f"a replica named {config.name!r} already exists; remove it with 'uniframe rm {config.name}' or pick another --name")
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(config.image.ref.split(":")[0]).name) or "replica"
        name = config.name or f"{base}-{replica_id[:4]}"
        directory = self.root / replica_id
        sock_len = len(str(directory / CONSOLE_SOCK))
        if sock_len > _UNIX_PATH_MAX:
            raise RuntimeDriverError(
                f"state directory {self.root} is too deep for unix sockets ({sock_len} > {_UNIX_PATH_MAX} bytes); "
                "point UNIFRAME_STATE at a shorter path"
            )
        directory.mkdir(parents=True)
        replica = Replica(id=replica_id, name=name, dir=directory, config=config,
                          created_at=utcnow(), driver=self.kind)
        self._save(replica)
        return replica

    def start(self, ref: str) -> Replica:
        """Boot the replica's microVM detached and return once QEMU answers QMP."""
        replica = self.get(ref)
        if self._running(replica):
            raise RuntimeDriverError(f"replica {replica.name} is already running")
        config = replica.config
        qemu = qemu_binary()
        ensure_free(list(config.ports))
        accel = choose_accel(config.accel, kernel=config.image.kernel)
        guest_ip, tap, netdev, ip_arg = self._network(replica)
        for name in (CONSOLE_SOCK, QMP_SOCK, EXIT_FILE):
            (replica.dir / name).unlink(missing_ok=True)
        console = replica.dir / CONSOLE_LOG
        log_offset = console.stat().st_size if console.exists() else 0
        vm = MicroVM(
            qemu=qemu, kernel=config.image.kernel, disk=config.image.disk,
            initrd=config.image.initrd if config.image.disk is None else None,
            cmdline=kernel_cmdline(config.image.cmdline, [ip_arg]),
            cpus=config.cpus, memory_mib=config.memory_mib, accel=accel.name,
            netdev=(netdev,), serial=console_chardev(replica.dir / CONSOLE_SOCK, console),
            qmp_socket=replica.dir / QMP_SOCK,
        )
        argv = vm.argv()
        proc = launch_detached(argv, replica.dir, replica.dir / QEMU_LOG)
        self._children[proc.pid] = proc
        try:
            pref = ProcessRef.of(proc.pid)
        except ProcessLookupError:
            pref = ProcessRef(proc.pid, -1)
        replica = replica.with_(pid=pref.pid, pid_start_time=pref.start_time, started_at=utcnow(),
                                accel=accel.name, guest_ip=guest_ip, tap=tap,
                                log_offset=log_offset, argv=tuple(argv))
        self._save(replica)
        self._wait_ready(replica, proc)
        return replica

    def _network(self, replica: Replica) -> tuple[str, str | None, str, str]:
        """(guest IP, tap name, -netdev value, ip= kernel argument) for the replica."""
        config = replica.config
        if config.network == "user":
            ports = [(p.host_ip, p.host_port, p.guest_port) for p in config.ports]
            return USER_NET_GUEST_IP, None, user_netdev(ports), USER_NET_IP_ARG
        attachment = network.attach(self.root.parent, replica.id, list(config.ports))
        return attachment.guest_ip, attachment.tap, attachment.netdev, attachment.ip_arg

    def _wait_ready(self, replica: Replica, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        qmp = Qmp(replica.dir / QMP_SOCK, timeout=2.0)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._release_network(replica)
                log = _tail(replica.dir / QEMU_LOG)
                forward = re.search(r"host forwarding rule '([^']*)'", log)
                if forward:
                    raise PortInUseError(f"QEMU could not publish {forward.group(1)} (port taken?): {log}")
                raise RuntimeDriverError(f"QEMU exited with status {proc.returncode} while starting {replica.name}:\n{log}\n(full log: {replica.dir / QEMU_LOG})")
            if (replica.dir / QMP_SOCK).exists():
                with contextlib.suppress(QmpError):
                    qmp.status()
                    return
            time.sleep(0.05)
        raise RuntimeDriverError(f"QEMU for {replica.name} did not answer QMP within {START_TIMEOUT_S:.0f} s; see {replica.dir / QEMU_LOG}")

    def _process(self, replica: Replica) -> ProcessRef | None:
        if replica.pid is None or replica.pid_start_time is None:
            return None
        return ProcessRef(replica.pid, replica.pid_start_time)

    def _running(self, replica: Replica) -> bool:
        return launched_alive(replica.pid, replica.pid_start_time, self._children)

    def inspect(self, ref: str) -> ReplicaStatus:
        """Running, or how it ended: the guest's exit status, or crashed if it gave none."""
        return self._status(self.get(ref))

    def _status(self, replica: Replica, how: str = "") -> ReplicaStatus:
        if replica.pid is None:
            return ReplicaStatus(ReplicaState.CREATED)
        if self._running(replica):
            return ReplicaStatus(ReplicaState.RUNNING)
        exit_file = replica.dir / EXIT_FILE
        with contextlib.suppress(OSError, ValueError, KeyError):
            return ReplicaStatus.from_json(json.loads(exit_file.read_text()))
        status = self._guest_exit_status(replica)
        if status is not None:
            result = ReplicaStatus(ReplicaState.EXITED, status, how or "the guest exited", utcnow())
        else:
            reason = how or "the VM stopped without an exit status from the guest"
            tail = _tail(replica.dir / QEMU_LOG, 2)
            result = ReplicaStatus(ReplicaState.CRASHED, None, f"{reason}{': ' + tail if tail and not how else ''}", utcnow())
        self._release_network(replica)
        tmp = exit_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_json()) + "\n")
        os.replace(tmp, exit_file)
        return result

    def _guest_exit_status(self, replica: Replica) -> int | None:
        try:
            with (replica.dir / CONSOLE_LOG).open("rb") as fh:
                fh.seek(replica.log_offset)
                matches = EXIT_LINE.findall(fh.read())
        except OSError:
            return None
        return int(matches[-1]) if matches else None

    def wait(self, ref: str, timeout: float | None = None) -> ReplicaStatus:
        """Block until the replica is no longer running (or ``timeout`` passes)."""
        replica = self.get(ref)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._running(replica):
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return self._status(replica)

    def _type_on_console(self, replica: Replica, data: bytes, linger: float) -> ReplicaStatus | None:
        """Type ``data`` on the guest's serial console, staying connected for ``linger`` s.

        QEMU's UART takes input only as fast as the guest drains its FIFO and
        drops what is still unread when the client hangs up, so the connection
        stays open (its copy of the console output read and discarded) until
        the replica stops or ``linger`` passes. Returns the status if it stopped.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(str(replica.dir / CONSOLE_SOCK))
            sock.sendall(data)
            sock.setblocking(False)
            deadline = time.monotonic() + linger
            while self._running(replica):
                with contextlib.suppress(BlockingIOError):
                    if not sock.recv(65536):
                        break
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.05)
        return self._status(replica) if self._wait_gone(replica, 1.0) else None

    def send_console(self, ref: str, data: bytes, linger: float = 1.0) -> None:
        """Type ``data`` on the guest's serial console."""
        self._type_on_console(self.get(ref), data, linger)

    def stop(self, ref: str, timeout: float = 10.0) -> ReplicaStatus:
        """Shutdown line on the console, wait ``timeout``; then QMP ``quit``; then SIGKILL."""
        replica = self.get(ref)
        if not self._running(replica):
            return self._status(replica)
        try:
            stopped = self._type_on_console(replica, SHUTDOWN_LINE, timeout)
        except OSError:
            stopped = self.wait(replica.id, timeout)
        if stopped is not None and stopped.state is not ReplicaState.RUNNING:
            return stopped
        with contextlib.suppress(QmpError):
            Qmp(replica.dir / QMP_SOCK, timeout=2.0).quit()
        if self._wait_gone(replica, 3.0):
            return self._status(replica, f"did not shut down within {timeout:g} s; stopped with QMP quit")
        pref = self._process(replica)
        if pref is not None:
            pref.signal(signal.SIGKILL)
        self._wait_gone(replica, 5.0)
        return self._status(replica, f"did not shut down within {timeout:g} s; killed")

    def _wait_gone(self, replica: Replica, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self._running(replica):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def remove(self, ref: str, force: bool = False) -> Replica:
        """Delete the replica's directory; a running replica needs ``force`` (it is killed)."""
        replica = self.get(ref)
        if self._running(replica):
            if not force:
                raise RuntimeDriverError(f"replica {replica.name} is running; stop it first ('uniframe stop {replica.name}') or use rm -f")
            self.stop(replica.id, timeout=0)
        self._release_network(replica)
        shutil.rmtree(replica.dir, ignore_errors=True)
        return replica

    def _release_network(self, replica: Replica) -> None:
        if replica.config.network == "bridge":
            network.detach(self.root.parent, replica.id, replica.tap, replica.guest_ip)

    def logs(self, ref: str, follow: bool = False, offset: int = 0) -> Iterator[bytes]:
        """The console log from ``offset``; with ``follow``, until the replica stops."""
        replica = self.get(ref)
        path = replica.dir / CONSOLE_LOG
        yield from self._read_log(path, offset, follow, lambda: self._running(replica))
