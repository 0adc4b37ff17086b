"""The QEMU command line for a full VM: ``-M q35`` with virtio devices.

Unlike the microVM, this is an ordinary PC: PCI, ACPI (so QMP
``system_powerdown`` presses a power button the guest's systemd acts on) and
firmware (SeaBIOS) that can boot a disk's own boot loader. Our own images skip
the firmware's boot loader step with ``-kernel``/``-initrd``; users' disks boot
through it.

- ``-nodefaults -no-user-config``: no default VGA, NIC or CD-ROM; every device
  is listed here. ``-display none``: the serial console is the only output.
- ``-no-reboot``: a guest that reboots or panics exits, and the runtime, not
  QEMU, decides whether to start it again.
- virtio-net's ``romfile=``: no PXE option ROM, nothing here boots from the
  network, and SeaBIOS would spend emulated time loading it.
- TCG gets the microVM's bounded translation cache (``tb-size``), but larger by
  default, because a full Debian runs far more distinct code than one server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from uniframe.runtime.qemu.microvm import RAM_ID, GuestMemory, accel_args, qemu_opt

DEFAULT_TB_SIZE_MIB = 128


def tb_size_mib() -> int:
    """TCG translation cache for full VMs in MiB; ``UNIFRAME_VM_TB_SIZE`` overrides."""
    value = os.environ.get("UNIFRAME_VM_TB_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_TB_SIZE_MIB


@dataclass(frozen=True)
class FullVM:
    """Everything QEMU needs to boot one q35 VM."""

    qemu: str
    disk: Path                      # the replica's overlay (qcow2)
    cpus: int = 1
    memory_mib: int = 512
    accel: str = "tcg"
    tb_size: int | None = None
    kernel: Path | None = None      # direct kernel boot; None boots the disk's own loader
    initrd: Path | None = None
    cmdline: str = ""
    seed: Path | None = None        # a cloud-init NoCloud volume, as a second read-only disk
    netdev: str | None = None       # e.g. "user,id=net0,hostfwd=tcp:127.0.0.1:8080-:8080"
    serial: tuple[str, ...] = ("-serial", "stdio")
    qmp_socket: Path | None = None
    memory: GuestMemory | None = None  # guest RAM in a file (snapshots); None: anonymous
    incoming: bool = False             # wait for a migration stream (a restore)

    def argv(self) -> list[str]:
        machine = "q35" if self.memory is None else f"q35,memory-backend={RAM_ID}"
        argv = [self.qemu, "-M", machine, *accel_args(self.accel, self.tb_size or tb_size_mib()),
                "-smp", str(self.cpus), "-m", f"{self.memory_mib}M",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-drive", f"file={qemu_opt(self.disk)},if=none,id=disk0,format=qcow2,discard=unmap"]
        # With -kernel, QEMU's own loader ROM holds boot index 0; without it, the disk boots.
        argv += ["-device", "virtio-blk-pci,drive=disk0" + (",bootindex=0" if self.kernel is None else "")]
        if self.kernel is not None:
            argv += ["-kernel", str(self.kernel), "-append", self.cmdline]
            if self.initrd is not None:
                argv += ["-initrd", str(self.initrd)]
        if self.seed is not None:
            argv += ["-drive", f"file={qemu_opt(self.seed)},if=none,id=seed,format=raw,readonly=on",
                     "-device", "virtio-blk-pci,drive=seed"]
        if self.netdev is not None:
            argv += ["-netdev", self.netdev, "-device", "virtio-net-pci,netdev=net0,romfile="]
        argv += ["-device", "virtio-rng-pci", *self.serial]
        if self.qmp_socket is not None:
            argv += ["-qmp", f"unix:{qemu_opt(self.qmp_socket)},server=on,wait=off"]
        if self.memory is not None:
            argv += ["-object", self.memory.backend(self.memory_mib)]
        if self.incoming:
            argv += ["-incoming", "defer"]
        return argv
