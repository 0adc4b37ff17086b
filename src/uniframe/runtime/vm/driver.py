"""The QEMU ``-M q35`` full-VM driver: VM disk images and users' own disks, detached.

Each replica is a directory ``<state>/replicas/<id>/`` beside the microVMs'::

    replica.json   what was asked for and what was launched (pid + start time, argv, ports)
    disk.qcow2     the overlay every guest write lands in (the backing disk is never written)
    seed.iso       the cloud-init NoCloud volume, when cloud-init data was given
    qemu.log       QEMU's own stdout/stderr
    console.log    the guest's serial console, complete from the first byte
    qmp.sock       QMP: ``system_powerdown`` to stop, ``quit`` when that is ignored
    exit.json      how the replica ended, once someone has seen it end

A new process rebuilds everything from these files. Stopping is what a
hypervisor does to any PC: press the ACPI power button (QMP
``system_powerdown``; systemd-logind powers off), pressed again every few
seconds because a guest still booting ignores it; then ``quit``; then SIGKILL.
The guest's own last words on the console tell a power-off (``reboot: Power
down``) from a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

from uniframe.build.cloudinit import make_nocloud_seed
from uniframe.errors import RuntimeDriverError
from uniframe.paths import state_dir
from uniframe.runtime.driver import Driver
from uniframe.runtime.ports import PortInUseError, ensure_free
from uniframe.runtime.process import ProcessRef, launched_alive
from uniframe.runtime.qemu.accel import choose_accel
from uniframe.runtime.qemu.binary import qemu_binary
from uniframe.runtime.qemu.microvm import console_chardev, launch_detached, user_netdev
from uniframe.runtime.qemu.qmp import Qmp, QmpError
from uniframe.runtime.replica import Replica, ReplicaConfig, ReplicaState, ReplicaStatus, utcnow
from uniframe.runtime.vm.config import VMConfig
from uniframe.runtime.vm.disks import create_overlay, inspect_disk
from uniframe.runtime.vm.machine import FullVM

REPLICA_FILE = "replica.json"
EXIT_FILE = "exit.json"
CONSOLE_LOG = "console.log"
CONSOLE_SOCK = "console.sock"
QMP_SOCK = "qmp.sock"
QEMU_LOG = "qemu.log"
OVERLAY = "disk.qcow2"
SEED = "seed.iso"

START_TIMEOUT_S = 15.0
POWER_BUTTON_EVERY_S = 5.0
MIN_MEMORY_MIB = 128
_UNIX_PATH_MAX = 107

# The kernel's last line on the way out, by how it went.
POWER_DOWN = b"reboot: Power down"
RESTART = b"reboot: Restarting system"
PANIC = re.compile(rb"Kernel panic - not syncing: ([^\r\n]*)")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(line for line in text.strip().splitlines()[-lines:] if not line.startswith("+ "))


class QemuVMDriver(Driver):
    """Create, start, stop, inspect and remove full-VM replicas on this host."""

    kind: ClassVar[str] = "qemu-vm"
    capabilities: ClassVar[frozenset[str]] = frozenset({
        "kernel-boot",      # our VM images: -kernel/-initrd/-append
        "firmware-boot",    # users' raw/qcow2 disks through SeaBIOS
        "cloud-init",       # NoCloud seed as a second drive
        "overlay-disk",     # the backing disk is never written
        "graceful-stop",    # ACPI power button
        "port-forward",     # user-mode networking with hostfwd
        "logs",
    })

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir() / "replicas"
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- records on disk -------------------------------------------------

    # -- lifecycle ---------------------------------------------------------

    def create(self, config: VMConfig | ReplicaConfig) -> Replica:
        """Check the disk, record the replica, make its overlay (and seed); :meth:`start` boots it."""
        vm = config if isinstance(config, VMConfig) else VMConfig.from_replica_config(config)
        if vm.cpus < 1 or vm.memory_mib < MIN_MEMORY_MIB:
            raise RuntimeDriverError(f"a full VM needs at least 1 CPU and {MIN_MEMORY_MIB}Mi of memory "
                                     f"(got {vm.cpus} CPUs, {vm.memory_mib}Mi)")
        backing = inspect_disk(vm.disk)
        for path in (vm.kernel, vm.initrd):
            if path is not None and not path.is_file():
                raise RuntimeDriverError(f"image {vm.ref}: {path} is missing; rebuild the image")
        if vm.name and vm.name in {r.name for r in self._all()}:
            raise RuntimeDriverError(f"a replica named {vm.name!r} already exists; remove it "
                                     f"with 'uniframe rm {vm.name}' or pick another name")
        replica_id = secrets.token_hex(6)
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(vm.ref.split(":")[0]).stem) or "vm"
        name = vm.name or f"{base}-{replica_id[:4]}"
        directory = self.root / replica_id
        if len(str(directory / CONSOLE_SOCK)) > _UNIX_PATH_MAX:
            raise RuntimeDriverError(f"state directory {self.root} is too deep for unix sockets; "
                                     "point UNIFRAME_STATE at a shorter path")
        directory.mkdir(parents=True)
        try:
            create_overlay(backing, directory / OVERLAY)
            if vm.cloud_init is not None:
                meta = {"instance-id": f"uniframe-{replica_id}", "local-hostname": name,
                        **vm.cloud_init.meta_data}
                make_nocloud_seed(vm.cloud_init.user_data, meta, vm.cloud_init.network_config,
                                  directory / SEED)
            replica = Replica(id=replica_id, name=name, dir=directory,
                              config=replace(vm, name=name).replica_config(),
                              created_at=utcnow(), driver=self.kind,
                              extra={**vm.extra(), "disk_format": backing.format})
            self._save(replica)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return replica

    def start(self, ref: str) -> Replica:
        """Boot the replica's VM detached and return once QEMU answers QMP."""
        replica = self.get(ref)
        if self._running(replica):
            raise RuntimeDriverError(f"replica {replica.name} is already running")
        vm = VMConfig.of_replica(replica)
        inspect_disk(vm.disk)   # the backing disk may have gone since create
        qemu = qemu_binary()
        ensure_free(list(vm.ports))
        # The probe is made for the tailored kernel; an image's own kernel could fail it for
        # reasons that have nothing to do with KVM.
        accel = choose_accel(vm.accel, kernel_factory=_probe_kernel)
        for name in (CONSOLE_SOCK, QMP_SOCK, EXIT_FILE):
            (replica.dir / name).unlink(missing_ok=True)
        console = replica.dir / CONSOLE_LOG
        log_offset = console.stat().st_size if console.exists() else 0
        seed = replica.dir / SEED
        machine = FullVM(
            qemu=qemu, disk=replica.dir / OVERLAY, cpus=vm.cpus, memory_mib=vm.memory_mib,
            accel=accel.name, kernel=vm.kernel, initrd=vm.initrd, cmdline=vm.cmdline,
            seed=seed if seed.exists() else None,
            netdev=user_netdev([(p.host_ip, p.host_port, p.guest_port) for p in vm.ports]),
            serial=console_chardev(replica.dir / CONSOLE_SOCK, console),
            qmp_socket=replica.dir / QMP_SOCK,
        )
        argv = machine.argv()
        proc = launch_detached(argv, replica.dir, replica.dir / QEMU_LOG)
        self._children[proc.pid] = proc
        try:
            pref = ProcessRef.of(proc.pid)
        except ProcessLookupError:
            pref = ProcessRef(proc.pid, -1)
        replica = replica.with_(pid=pref.pid, pid_start_time=pref.start_time, started_at=utcnow(),
                                accel=accel.name, guest_ip=None, log_offset=log_offset,
                                argv=tuple(argv))
        self._save(replica)
        self._wait_ready(replica, proc)
        return replica

    def _wait_ready(self, replica: Replica, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        qmp = Qmp(replica.dir / QMP_SOCK, timeout=2.0)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = _tail(replica.dir / QEMU_LOG)
                forward = re.search(r"host forwarding rule '([^']*)'", log)
                if forward:
                    raise PortInUseError(f"QEMU could not publish {forward.group(1)} (port taken?): {log}")
                raise RuntimeDriverError(f"QEMU exited with status {proc.returncode} while starting "
                                         f"{replica.name}:\n{log}\n(full log: {replica.dir / QEMU_LOG})")
            if (replica.dir / QMP_SOCK).exists():
                with contextlib.suppress(QmpError):
                    qmp.status()
                    return
            time.sleep(0.05)
        raise RuntimeDriverError(f"QEMU for {replica.name} did not answer QMP within "
                                 f"{START_TIMEOUT_S:.0f} s; see {replica.dir / QEMU_LOG}")

    def _process(self, replica: Replica) -> ProcessRef | None:
        if replica.pid is None or replica.pid_start_time is None:
            return None
        return ProcessRef(replica.pid, replica.pid_start_time)

    def _running(self, replica: Replica) -> bool:
        return launched_alive(replica.pid, replica.pid_start_time, self._children)

    def inspect(self, ref: str) -> ReplicaStatus:
        """Running, or how it ended: powered off, rebooted, panicked or killed."""
        return self._status(self.get(ref))

    def _status(self, replica: Replica, how: str = "") -> ReplicaStatus:
        if replica.pid is None:
            return ReplicaStatus(ReplicaState.CREATED)
        if self._running(replica):
            return ReplicaStatus(ReplicaState.RUNNING)
        exit_file = replica.dir / EXIT_FILE
        with contextlib.suppress(OSError, ValueError, KeyError):
            return ReplicaStatus.from_json(json.loads(exit_file.read_text()))
        result = self._ending(replica, how)
        tmp = exit_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_json()) + "\n")
        os.replace(tmp, exit_file)
        return result

    def _ending(self, replica: Replica, how: str) -> ReplicaStatus:
        """How the guest went, from the end of its console (a PC has no exit status)."""
        try:
            with (replica.dir / CONSOLE_LOG).open("rb") as fh:
                fh.seek(replica.log_offset)
                said = fh.read()
        except OSError:
            said = b""
        if how:
            return ReplicaStatus(ReplicaState.CRASHED, None, how, utcnow())
        if POWER_DOWN in said:
            return ReplicaStatus(ReplicaState.EXITED, 0, "the guest powered off", utcnow())
        panic = PANIC.search(said)
        if panic:
            return ReplicaStatus(ReplicaState.CRASHED, None,
                                 f"kernel panic: {panic.group(1).decode(errors='replace')}", utcnow())
        if RESTART in said:
            return ReplicaStatus(ReplicaState.EXITED, None,
                                 "the guest rebooted (a VM exits on reboot; start it again)", utcnow())
        tail = _tail(replica.dir / QEMU_LOG, 2)
        return ReplicaStatus(ReplicaState.CRASHED, None,
                             "the VM stopped without powering off" + (f": {tail}" if tail else ""), utcnow())

    def wait(self, ref: str, timeout: float | None = None) -> ReplicaStatus:
        """Block until the replica is no longer running (or ``timeout`` passes)."""
        replica = self.get(ref)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._running(replica):
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        return self._status(replica)

    def stop(self, ref: str, timeout: float = 30.0) -> ReplicaStatus:
        """ACPI power button (repeated) for ``timeout`` seconds; then QMP ``quit``; then SIGKILL."""
        replica = self.get(ref)
        if not self._running(replica):
            return self._status(replica)
        qmp = Qmp(replica.dir / QMP_SOCK, timeout=2.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._running(replica):
            with contextlib.suppress(QmpError):
                qmp.execute("system_powerdown")
            self._wait_gone(replica, min(POWER_BUTTON_EVERY_S, max(0.0, deadline - time.monotonic())))
        if not self._running(replica):
            return self._status(replica)
        with contextlib.suppress(QmpError):
            qmp.quit()
        if self._wait_gone(replica, 3.0):
            return self._status(replica, f"did not power off within {timeout:g} s; stopped with QMP quit")
        pref = self._process(replica)
        if pref is not None:
            pref.signal(signal.SIGKILL)
        self._wait_gone(replica, 5.0)
        return self._status(replica, f"did not power off within {timeout:g} s; killed")

    def _wait_gone(self, replica: Replica, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self._running(replica):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def remove(self, ref: str, force: bool = False) -> Replica:
        """Delete the replica's directory (overlay, seed, logs); a running one needs ``force``."""
        replica = self.get(ref)
        if self._running(replica):
            if not force:
                raise RuntimeDriverError(f"replica {replica.name} is running; stop it first "
                                         f"('uniframe stop {replica.name}') or use rm -f")
            self.stop(replica.id, timeout=0)
        shutil.rmtree(replica.dir, ignore_errors=True)
        return replica

    def logs(self, ref: str, follow: bool = False, offset: int = 0) -> Iterator[bytes]:
        """The serial console from ``offset``; with ``follow``, until the replica stops."""
        replica = self.get(ref)
        path = replica.dir / CONSOLE_LOG
        yield from self._read_log(path, offset, follow, lambda: self._running(replica))


def _probe_kernel() -> Path:
    """A kernel for the KVM probe when the VM boots by firmware and brings none (built once, cached)."""
    from uniframe.build.kernel import ensure_kernel

    return ensure_kernel().path
