"""The QEMU command line for a ``-M microvm`` guest, and what every QEMU replica shares.

Both QEMU drivers (microVM here, full VM in :mod:`uniframe.runtime.qemu.vm`) launch
QEMU detached with its serial console logged and a QMP socket, wait for QMP
to answer, and force a stuck guest down with QMP ``quit``; those pieces
(:class:`QemuDriver`), and the record of what a run chose (:class:`QemuRecord`),
are at the end of this module.

Why these options (measured on the 2-core TCG host, see tests/runtime and the
DESIGN notes):

- ``acpi=off``: microvm then lists its virtio-mmio devices on the kernel
  command line, which our ACPI-less kernel needs; ``x-option-roms=off`` skips
  the linuxboot option ROM (boot to init ~0.2 s sooner). The legacy devices stay:
  under TCG there is no kvmclock, so without the PIT the kernel cannot
  calibrate its timer ("IO-APIC + timer doesn't work" panic) and without the
  PIC the boot hangs; the RTC gives the guest the wall-clock time at boot.
- ``-nodefaults -no-user-config``: nothing the host's QEMU config adds;
  ``-display none`` instead of ``-nographic`` because nothing is on stdio.
- ``-no-reboot`` with ``reboot=t`` on the kernel command line: a kernel without
  ACPI cannot power off, so the guest exits by rebooting and QEMU then exits.
- TCG gets ``-cpu max`` (RDRAND seeds the guest's entropy pool; no leaner
  model booted the iris image faster) and a bounded translation cache
  (``tb-size``): under TCG the code cache, not guest RAM, dominates QEMU's
  memory. Booting the iris service translates more code than any size we
  tried holds (128 MiB fills too), so the cache's RSS is its size. On a
  quiet host 32 MiB cost 8% more QEMU CPU to the first inference than
  64 MiB (4.38 vs 4.04 s) and saved 35 MB of RSS (249 vs 284 MiB); 48 MiB
  sat in between. Boot stays well inside its 8 s target and memory does
  not, hence 32 (bench/README.md, "Unikernel").
- Under TCG the kernel also gets ``tsc=reliable``, ``tsc_early_khz=`` and
  ``noapictimer`` (:func:`tcg_kernel_args`). QEMU's TSC is the host's, but
  the kernel's clocksource watchdog compares it with jiffies, which fall
  behind when the emulated CPU is busy, marks it unstable about a second
  into the boot and falls back to refined-jiffies (coarse, lagging time for
  the app); ``tsc=reliable`` skips the watchdog, and ``tsc_early_khz`` (the
  host's rate, :mod:`.tsc`) spares the kernel a PIT calibration that fails
  on a busy host. Calibrating the local APIC timer
  against the PIT takes ~0.2 s of the boot, and on a busy host the timer
  can fail its verification and be disabled anyway; ``noapictimer`` keeps
  the PIT as the clock event device from the start.
- A ``virtio-balloon-device`` with ``free-page-reporting=on``: the guest
  reports the pages it frees (the compressed initrd once unpacked, init
  memory) and QEMU drops them, ~20 MB less RSS after boot. The balloon is
  never inflated; only the reporting is used. Not for RAM in a file
  (:class:`GuestMemory`, snapshots): dropping a reported page punches a hole
  in the file, and template and clones must have the same devices.
- A read-only root disk (``disk``) is a raw ``virtio-blk-device`` opened with
  ``readonly=on``: the guest cannot write to the image, and QEMU then takes
  only a shared lock on the file, so any number of replicas boot from the
  same image file at once. It is read through the host's page cache
  (``cache=writeback``, QEMU's default), which those replicas share.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from uniframe.errors import RuntimeDriverError
from uniframe.guest.cmdline import KERNEL_ARGS
from uniframe.runtime import hostnet
from uniframe.runtime.driver import Driver, log_tail
from uniframe.runtime.ports import PortInUseError
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.qemu.qmp import Qmp, QmpError
from uniframe.runtime.qemu.tsc import host_tsc_khz
from uniframe.runtime.replica import Replica

MACHINE = "microvm,acpi=off,x-option-roms=off"
DEFAULT_TB_SIZE_MIB = 32

# Kernel arguments for a guest whose CPU QEMU emulates (see the module docstring).
TCG_KERNEL_ARGS = ("tsc=reliable", "noapictimer")

# Kernel arguments every uniframe guest needs (console, reboot=t, panic=-1,
# random.trust_cpu=on), defined beside the guest init that relies on them.
RUNTIME_KERNEL_ARGS = dict(arg.split("=", 1) for arg in KERNEL_ARGS)

# The files of a QEMU replica's directory.
CONSOLE_LOG = "console.log"    # the guest's serial console, complete from the first byte
CONSOLE_SOCK = "console.sock"  # the console's input
QMP_SOCK = "qmp.sock"
QEMU_LOG = "qemu.log"          # QEMU's own stdout/stderr
START_TIMEOUT_S = 15.0         # launch to QMP answering
QMP_POLL_S = 0.005             # QMP answers ~20 ms after launch; a restore waits for exactly that

USER_NET_GUEST_IP = "10.0.2.15"
USER_NET_IP_ARG = f"ip={USER_NET_GUEST_IP}::10.0.2.2:255.255.255.0::eth0:off"


def qemu_opt(value: object) -> str:
    """A value inside a QEMU ``key=value,...`` option list (a comma is written twice)."""
    return str(value).replace(",", ",,")


def tb_size_mib() -> int:
    """TCG translation cache size in MiB; ``UNIFRAME_TCG_TB_SIZE`` overrides (0: QEMU's default)."""
    value = os.environ.get("UNIFRAME_TCG_TB_SIZE", "")
    return int(value) if value.isdigit() else DEFAULT_TB_SIZE_MIB


def accel_args(accel: str, tb_size: int | None = None) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    size = tb_size_mib() if tb_size is None else tb_size
    return ["-accel", f"tcg,tb-size={size}" if size else "tcg", "-cpu", "max"]


def kernel_cmdline(image_cmdline: str, extra: list[str]) -> str:
    """The image's command line plus the runtime's keys, kept before any ``--``.

    Arguments after ``--`` belong to init; the runtime's keys (console, reboot
    mode, ``ip=``) are for the kernel, so they go in front of it. A key the
    image already sets is left as the image set it, except ``ip=``, which only
    the runtime knows.
    """
    kernel_part, sep, init_part = f" {image_cmdline} ".partition(" -- ")
    words = [w for w in kernel_part.split() if not (w.startswith("ip=") and any(e.startswith("ip=") for e in extra))]
    present = {w.split("=", 1)[0] for w in words}
    words += [f"{k}={v}" for k, v in RUNTIME_KERNEL_ARGS.items() if k not in present]
    words += extra
    line = " ".join(words)
    return f"{line} -- {init_part.strip()}".strip() if sep else line


def tcg_kernel_args() -> list[str]:
    """:data:`TCG_KERNEL_ARGS`, plus ``tsc_early_khz`` where the host's TSC rate is known."""
    khz = host_tsc_khz()
    return [*TCG_KERNEL_ARGS, *([f"tsc_early_khz={khz}"] if khz else [])]


def add_kernel_args(cmdline: str, args: Sequence[str]) -> str:
    """``cmdline`` plus each of ``args`` whose key it does not set yet, kept before any ``--``."""
    kernel_part, sep, init_part = f" {cmdline} ".partition(" -- ")
    words = kernel_part.split()
    present = {w.split("=", 1)[0] for w in words}
    words += [a for a in args if a.split("=", 1)[0] not in present]
    line = " ".join(words)
    return f"{line} -- {init_part.strip()}".strip() if sep else line


RAM_ID = "ram"  # the id of the guest RAM's memory backend object
RAM_DIR = Path("/dev/shm")  # where snapshottable replicas keep their RAM (UNIFRAME_RAM_DIR overrides)


def own_ram_file(replica_id: str) -> Path:
    """The shared RAM file of a snapshottable replica.

    On tmpfs, not beside the replica's records: a shared mapping of a file on
    a disk file system allocates blocks as the guest first writes each page
    and the kernel keeps writing dirty guest RAM back to the disk; on tmpfs
    it is memory like anonymous RAM. The driver deletes it when the replica's
    end is seen; a snapshot keeps a copy of its own.
    """
    directory = Path(os.environ.get("UNIFRAME_RAM_DIR") or RAM_DIR)
    if not (directory.is_dir() and os.access(directory, os.W_OK)):
        raise RuntimeDriverError(f"{directory} is not a writable directory for guest RAM files; "
                                 "point UNIFRAME_RAM_DIR at a tmpfs directory")
    return directory / f"uniframe-{replica_id}.ram"


@dataclass(frozen=True)
class GuestMemory:
    """Guest RAM kept in a file instead of anonymous memory, so a snapshot can leave it out.

    With QEMU's ``x-ignore-shared`` migration capability, RAM in a *shared*
    file backend is not streamed: the saved state is only the devices (~50 KB)
    and the RAM stays in the file. A replica that may become a template maps
    its own file ``shared``; a clone maps the template's file *privately*
    (``shared=False``): copy-on-write, so every clone of one template shares its
    unchanged pages through the page cache and none can change the template.
    """

    path: Path
    shared: bool = True

    def backend(self, memory_mib: int) -> str:
        """The ``-object`` value (its size must equal ``-m``)."""
        return (f"memory-backend-file,id={RAM_ID},size={memory_mib}M,"
                f"mem-path={qemu_opt(self.path)},share={'on' if self.shared else 'off'}")


@dataclass(frozen=True)
class MicroVM:
    """Everything QEMU needs to boot one microVM."""

    qemu: str
    kernel: Path
    cmdline: str
    initrd: Path | None = None
    disk: Path | None = None              # read-only root file system, the guest's /dev/vda
    cpus: int = 1
    memory_mib: int = 256
    accel: str = "tcg"
    tb_size: int | None = None
    machine: str = MACHINE
    netdev: tuple[str, ...] = ()          # e.g. ("user,id=net0,hostfwd=...",)
    rng: bool = True
    free_page_reporting: bool = True
    serial: tuple[str, ...] = ("-serial", "stdio")
    qmp_socket: Path | None = None
    memory: GuestMemory | None = None     # guest RAM in a file (snapshots); None: anonymous
    incoming: bool = False                # wait for a migration stream (a restore)
    extra: tuple[str, ...] = field(default=())

    def argv(self) -> list[str]:
        cmdline = add_kernel_args(self.cmdline, tcg_kernel_args()) if self.accel == "tcg" else self.cmdline
        machine = self.machine if self.memory is None else f"{self.machine},memory-backend={RAM_ID}"
        argv = [self.qemu, "-M", machine, *accel_args(self.accel, self.tb_size),
                "-smp", str(self.cpus), "-m", f"{self.memory_mib}M",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(self.kernel), "-append", cmdline]
        if self.initrd is not None:
            argv += ["-initrd", str(self.initrd)]
        if self.disk is not None:
            argv += ["-drive", f"if=none,id=root,file={qemu_opt(self.disk)},format=raw,readonly=on",
                     "-device", "virtio-blk-device,drive=root"]
        argv += list(self.serial)
        if self.qmp_socket is not None:
            argv += ["-qmp", f"unix:{qemu_opt(self.qmp_socket)},server=on,wait=off"]
        if self.rng:
            argv += ["-device", "virtio-rng-device"]
        if self.free_page_reporting and self.memory is None:
            # reported pages are punched out of a RAM file: never for file-backed RAM
            argv += ["-device", "virtio-balloon-device,free-page-reporting=on"]
        for i, netdev in enumerate(self.netdev):
            argv += ["-netdev", netdev, "-device", f"virtio-net-device,netdev=net{i}"]
        if self.memory is not None:
            argv += ["-object", self.memory.backend(self.memory_mib)]
        if self.incoming:
            argv += ["-incoming", "defer"]
        return argv + list(self.extra)


def console_chardev(socket_path: Path, log_path: Path) -> tuple[str, ...]:
    """The serial console: logged to a file, and a socket the host can write to.

    The log is written whether or not a client is connected (QEMU drops output
    it cannot send and still logs it), so ``console.log`` is complete, while
    ``uniframe stop`` connects only long enough to type the shutdown line.
    """
    return ("-chardev",
            f"socket,id=console,path={qemu_opt(socket_path)},server=on,wait=off,"
            f"logfile={qemu_opt(log_path)},logappend=on",
            "-serial", "chardev:console")


def user_netdev(ports: list[tuple[str, int, int]]) -> str:
    """QEMU user-mode networking with one ``hostfwd`` per (host_ip, host_port, guest_port)."""
    fwd = "".join(f",hostfwd=tcp:{ip}:{host}-:{guest}" for ip, host, guest in ports)
    return f"user,id=net0{fwd}"


def launch_detached(argv: list[str], cwd: Path, output: Path) -> subprocess.Popen[bytes]:
    """Start QEMU in its own session (Ctrl-C in the CLI never reaches it), output to a file."""
    with output.open("ab") as out:
        out.write(f"+ {shlex.join(argv)}\n".encode())
        out.flush()
        return subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)


@dataclass(frozen=True)
class QemuRecord:
    """What a QEMU driver chose for a replica's run, kept in ``Replica.extra``.

    The accelerator the probe picked, and for a bridged microVM its tap device
    and address (the keys are the ones older records kept at the top level).
    A run whose RAM is in a file records it (``ram_file``: the replica's own
    shared file, or the template a clone maps privately) and, for a clone, the
    snapshot it was restored from.
    """

    accel: str | None = None
    guest_ip: str | None = None
    tap: str | None = None
    ram_file: str | None = None
    restored_from: str | None = None

    @classmethod
    def of(cls, replica: Replica) -> QemuRecord:
        e = replica.extra
        return cls(e.get("accel"), e.get("guest_ip"), e.get("tap"), e.get("ram_file"),
                   e.get("restored_from"))

    def on(self, replica: Replica) -> Replica:
        """``replica`` carrying this record."""
        extra = {**replica.extra, "accel": self.accel, "guest_ip": self.guest_ip, "tap": self.tap}
        for key, value in (("ram_file", self.ram_file), ("restored_from", self.restored_from)):
            if value is None:
                extra.pop(key, None)
            else:
                extra[key] = value
        return replica.with_(extra=extra)


def qemu_log_tail(path: Path, lines: int = 5) -> str:
    """The last lines of QEMU's log, without the ``+ argv`` line :func:`launch_detached` writes."""
    return log_tail(path, lines, skip="+ ")


class QemuDriver(Driver):
    """What both QEMU drivers share: the serial console is the log, a launch has taken
    once QMP answers, QMP ``quit`` is the forced stop, and the run's record says the
    accelerator."""

    log_file: ClassVar[str] = CONSOLE_LOG

    def accelerator(self, replica: Replica) -> str | None:
        return QemuRecord.of(replica).accel

    def _until_started(self, replica: Replica, proc: subprocess.Popen[bytes]) -> ProcessRef | None:
        """Once QEMU answers QMP; a host port it could not forward is a PortInUseError."""
        deadline = time.monotonic() + START_TIMEOUT_S
        qmp = Qmp(replica.dir / QMP_SOCK, timeout=2.0)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = qemu_log_tail(replica.dir / QEMU_LOG)
                forward = re.search(r"host forwarding rule '([^']*)'", log)
                if forward:
                    raise PortInUseError(f"QEMU could not publish {forward.group(1)} (port taken?): {log}")
                raise RuntimeDriverError(f"QEMU exited with status {proc.returncode} while starting "
                                         f"{replica.name}:\n{log}\n(full log: {replica.dir / QEMU_LOG})")
            if (replica.dir / QMP_SOCK).exists():
                with contextlib.suppress(QmpError):
                    qmp.status()
                    # its published ports stay claimed as long as QEMU runs
                    hostnet.bind(self.root.parent, replica.id, *self._processes(replica))
                    return None
            time.sleep(QMP_POLL_S)
        raise RuntimeDriverError(f"QEMU for {replica.name} did not answer QMP within "
                                 f"{START_TIMEOUT_S:.0f} s; see {replica.dir / QEMU_LOG}")

    def _release(self, replica: Replica) -> None:
        """The host ports QEMU's user-mode network forwarded (claimed before launch)."""
        hostnet.release(self.root.parent, replica.id)

    def _force_stop(self, replica: Replica) -> str | None:
        """QMP ``quit``: QEMU ends at once, whatever the guest is doing."""
        with contextlib.suppress(QmpError):
            Qmp(replica.dir / QMP_SOCK, timeout=2.0).quit()
        return "stopped with QMP quit"

    @staticmethod
    def _console(replica: Replica) -> bytes:
        """What the guest said on its console during its last run."""
        try:
            with (replica.dir / CONSOLE_LOG).open("rb") as fh:
                fh.seek(replica.log_offset)
                return fh.read()
        except OSError:
            return b""
