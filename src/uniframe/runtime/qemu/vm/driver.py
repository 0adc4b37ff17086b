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
import json
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
    GuestMemory,
    QemuRecord,
    console_chardev,
    launch_detached,
    qemu_log_tail,
    user_netdev,
)
from uniframe.runtime.qemu.qmp import Qmp, QmpError
from uniframe.runtime.qemu.snapshot import Fact, StoredSnapshot, snapshot_facts
from uniframe.runtime.qemu.snapshot_driver import SnapshotTemplates
from uniframe.runtime.qemu.vm.config import VMConfig
from uniframe.runtime.qemu.vm.disks import DiskInfo, create_overlay, inspect_disk
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


class QemuVMDriver(SnapshotTemplates):
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
        memory, pending = self._guest_memory(replica)
        argv = self._machine(vm, replica.dir, qemu, accel.name, memory, pending is not None,
                             seed=(replica.dir / SEED).exists()).argv()
        record = QemuRecord(accel=accel.name, ram_file=str(memory.path) if memory is not None else None,
                            restored_from=pending.snapshot.id if pending is not None else None)
        hostnet.claim_ports(self.root.parent, replica, vm.ports)  # hostfwd binds them
        try:
            proc = launch_detached(argv, replica.dir, replica.dir / QEMU_LOG)
        except BaseException:
            self._release(record.on(replica))
            raise
        return record.on(replica.with_(argv=tuple(argv))), proc

    @staticmethod
    def _machine(vm: VMConfig, directory: Path, qemu: str, accel: str, memory: GuestMemory | None,
                 incoming: bool, *, seed: bool) -> FullVM:
        """The machine for ``vm`` in ``directory``; one place, so a restore's key and its launch agree."""
        return FullVM(
            qemu=qemu, disk=directory / OVERLAY, cpus=vm.cpus, memory_mib=vm.memory_mib,
            accel=accel, kernel=vm.kernel, initrd=vm.initrd, cmdline=vm.cmdline,
            seed=directory / SEED if seed else None,
            netdev=user_netdev([(p.host_ip, p.host_port, p.guest_port) for p in vm.ports]),
            serial=console_chardev(directory / CONSOLE_SOCK, directory / CONSOLE_LOG),
            qmp_socket=directory / QMP_SOCK, memory=memory, incoming=incoming,
        )

    def _release(self, replica: Replica) -> None:
        """Its port claims and its own RAM file."""
        super()._release(replica)
        self._release_ram(replica)

    # -- snapshots (the flow: runtime/qemu/snapshot_driver.py) ------------------------------
    # A template also keeps the overlay (every guest write so far) and the cloud-init seed,
    # copied while the guest is paused (its disks flushed and released by the migration); a
    # clone's overlay reads from the template's, so a clone sees exactly the source's disk.

    @staticmethod
    def _disk_facts(vm: VMConfig) -> dict[str, Fact]:
        """The backing disk (a user's disk has no image digest: its path, size and mtime) and
        the cloud-init data the template booted with."""
        st = vm.disk.stat()
        return {"disk": f"{vm.disk} {st.st_size} {st.st_mtime_ns}",
                "cloud_init": json.dumps(vm.cloud_init.to_json(), sort_keys=True) if vm.cloud_init else None}

    def _facts_for(self, config: ReplicaConfig) -> dict[str, Fact]:
        vm = VMConfig.from_replica_config(config)
        accel = choose_accel(vm.accel, kernel_factory=_probe_kernel).name
        placeholder = Path("/<replica>")
        machine = self._machine(vm, placeholder, qemu_binary(), accel,
                                GuestMemory(placeholder / "ram", shared=False), True,
                                seed=vm.cloud_init is not None)
        return snapshot_facts(machine.argv(), replica_dir=placeholder, image=config.image, accel=accel,
                              network="user", driver=self.kind, more=self._disk_facts(vm))

    def _replica_facts(self, replica: Replica) -> dict[str, Fact]:
        return snapshot_facts(replica.argv, replica_dir=replica.dir, image=replica.config.image,
                              accel=QemuRecord.of(replica).accel, network="user", driver=self.kind,
                              more=self._disk_facts(VMConfig.of_replica(replica)))

    def _template_files(self, replica: Replica) -> dict[str, Path]:
        files = {OVERLAY: replica.dir / OVERLAY}
        if (replica.dir / SEED).exists():
            files[SEED] = replica.dir / SEED
        return files

    def _prepare_clone(self, replica: Replica, stored: StoredSnapshot) -> None:
        """The clone's overlay over the template's (read-only from now on), its seed the template's."""
        template_disk = stored.dir / OVERLAY
        if not template_disk.is_file():
            raise RuntimeDriverError(f"snapshot {stored.snapshot.id} has no {OVERLAY}; take a new one")
        template_disk.chmod(0o444)
        create_overlay(DiskInfo(template_disk, "qcow2", 0, 0), replica.dir / OVERLAY)
        if (stored.dir / SEED).exists():
            shutil.copyfile(stored.dir / SEED, replica.dir / SEED)

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
