"""The QEMU ``-M q35`` full-VM driver: VM disk images and users' own disks, detached.

Each replica is a directory ``<state>/replicas/<id>/`` beside the microVMs'::

    replica.json   what was asked for and what was launched (pid + start time, argv, ports)
    disk.qcow2     the overlay every guest write lands in (the backing disk is never written)
    seed.iso       the cloud-init NoCloud volume, when cloud-init data was given
    qemu.log       QEMU's own stdout/stderr
    console.log    the guest's serial console, complete from the first byte
    qmp.sock       QMP: ``system_powerdown`` to stop, ``quit`` when that is ignored
    exit.json      how the replica ended, once someone has seen it end (runtime.driver)

A new process rebuilds everything from these files. Stopping is what a
hypervisor does to any PC: press the ACPI power button (QMP
``system_powerdown``; systemd-logind powers off), pressed again every few
seconds because a guest still booting ignores it; then ``quit``; then SIGKILL.
The guest's own last words on the console tell a power-off (``reboot: Power
down``) from a crash.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

from uniframe.build.cloudinit import make_nocloud_seed
from uniframe.errors import RuntimeDriverError
from uniframe.runtime import hostnet
from uniframe.runtime.qemu.accel import choose_accel
from uniframe.runtime.qemu.binary import qemu_binary
from uniframe.runtime.qemu.microvm import (
    CONSOLE_LOG,
    CONSOLE_SOCK,
    QEMU_LOG,
    QMP_SOCK,
    QemuDriver,
    QemuRecord,
    console_chardev,
    launch_detached,
    qemu_log_tail,
    user_netdev,
)
from uniframe.runtime.qemu.qmp import Qmp, QmpError
from uniframe.runtime.qemu.vm.config import VMConfig
from uniframe.runtime.qemu.vm.disks import create_overlay, inspect_disk
from uniframe.runtime.qemu.vm.machine import FullVM
from uniframe.runtime.replica import Replica, ReplicaConfig, ReplicaState, ReplicaStatus

__all__ = ["CONSOLE_LOG", "OVERLAY", "SEED", "QemuVMDriver"]

OVERLAY = "disk.qcow2"
SEED = "seed.iso"

POWER_BUTTON_EVERY_S = 5.0
MIN_MEMORY_MIB = 128

# The kernel's last line on the way out, by how it went.
POWER_DOWN = b"reboot: Power down"
RESTART = b"reboot: Restarting system"
PANIC = re.compile(rb"Kernel panic - not syncing: ([^\r\n]*)")


class QemuVMDriver(QemuDriver):
    """Create, start, stop, inspect and remove full-VM replicas on this host."""

    kind: ClassVar[str] = "qemu-vm"
    stop_verb: ClassVar[str] = "power off"

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
        replica_id, name, directory = self._allocate(vm.name, Path(vm.ref.split(":")[0]).stem,
                                                     longest=CONSOLE_SOCK)
        try:
            create_overlay(backing, directory / OVERLAY)
            if vm.cloud_init is not None:
                meta = {"instance-id": f"uniframe-{replica_id}", "local-hostname": name,
                        **vm.cloud_init.meta_data}
                make_nocloud_seed(vm.cloud_init.user_data, meta, vm.cloud_init.network_config,
                                  directory / SEED)
            return self._record_new(replica_id, directory, replace(vm, name=name).replica_config(),
                                    {**vm.extra(), "disk_format": backing.format})
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def _launch(self, replica: Replica) -> tuple[Replica, subprocess.Popen[bytes]]:
        """QEMU on the replica's overlay (and seed), the backing disk checked again first."""
        vm = VMConfig.of_replica(replica)
        inspect_disk(vm.disk)   # the backing disk may have gone since create
        qemu = qemu_binary()
        # The probe is made for the tailored kernel; an image's own kernel could fail it for
        # reasons that have nothing to do with KVM.
        accel = choose_accel(vm.accel, kernel_factory=_probe_kernel)
        for name in (CONSOLE_SOCK, QMP_SOCK):
            (replica.dir / name).unlink(missing_ok=True)
        seed = replica.dir / SEED
        machine = FullVM(
            qemu=qemu, disk=replica.dir / OVERLAY, cpus=vm.cpus, memory_mib=vm.memory_mib,
            accel=accel.name, kernel=vm.kernel, initrd=vm.initrd, cmdline=vm.cmdline,
            seed=seed if seed.exists() else None,
            netdev=user_netdev([(p.host_ip, p.host_port, p.guest_port) for p in vm.ports]),
            serial=console_chardev(replica.dir / CONSOLE_SOCK, replica.dir / CONSOLE_LOG),
            qmp_socket=replica.dir / QMP_SOCK,
        )
        argv = machine.argv()
        hostnet.claim_ports(self.root.parent, replica, vm.ports)  # hostfwd binds them
        try:
            proc = launch_detached(argv, replica.dir, replica.dir / QEMU_LOG)
        except BaseException:
            self._release(replica)
            raise
        return QemuRecord(accel=accel.name).on(replica.with_(argv=tuple(argv))), proc

    def _how_it_ended(self, replica: Replica) -> ReplicaStatus:
        """How the guest went, from the end of its console (a PC has no exit status)."""
        said = self._console(replica)
        if POWER_DOWN in said:
            return ReplicaStatus(ReplicaState.EXITED, 0, "the guest powered off")
        panic = PANIC.search(said)
        if panic:
            return ReplicaStatus(ReplicaState.CRASHED, None,
                                 f"kernel panic: {panic.group(1).decode(errors='replace')}")
        if RESTART in said:
            return ReplicaStatus(ReplicaState.EXITED, None,
                                 "the guest rebooted (a VM exits on reboot; start it again)")
        tail = qemu_log_tail(replica.dir / QEMU_LOG, 2)
        return ReplicaStatus(ReplicaState.CRASHED, None,
                             "the VM stopped without powering off" + (f": {tail}" if tail else ""))

    def _ask_to_stop(self, replica: Replica, deadline: float) -> None:
        """The ACPI power button, pressed again every few seconds: a guest still booting ignores it."""
        qmp = Qmp(replica.dir / QMP_SOCK, timeout=2.0)
        while time.monotonic() < deadline and self._alive(replica):
            with contextlib.suppress(QmpError):
                qmp.execute("system_powerdown")
            self._wait_gone(replica, min(POWER_BUTTON_EVERY_S, max(0.0, deadline - time.monotonic())))

def _probe_kernel() -> Path:
    """A kernel for the KVM probe when the VM boots by firmware and brings none (built once, cached)."""
    from uniframe.build.kernel import ensure_kernel

    return ensure_kernel().path
