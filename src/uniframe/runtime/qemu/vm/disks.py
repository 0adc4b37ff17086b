"""The disks a full VM boots: checked with ``qemu-img info``, never written.

Every replica boots a qcow2 *overlay* in its own directory whose backing file
is the image's disk (from the store) or the user's disk. QEMU opens the backing
file read-only, so a VM can never change a stored image or a user's golden
disk, many replicas share one disk, and removing a replica (its directory) is
all it takes to forget what the guest wrote.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from uniframe.errors import RuntimeDriverError

SUPPORTED_FORMATS = ("qcow2", "raw")


class DiskError(RuntimeDriverError):
    """A VM disk is missing, unreadable or in a format the VM runtime does not boot."""


@dataclass(frozen=True)
class DiskInfo:
    path: Path
    format: str
    virtual_size: int
    actual_size: int


def _qemu_img() -> str:
    found = shutil.which("qemu-img")
    if found is None:
        raise RuntimeDriverError("qemu-img not found; install it with 'apt-get install qemu-utils' "
                                 "(or run scripts/install.sh)")
    return found


def inspect_disk(path: Path) -> DiskInfo:
    """The disk's real format (by content, not by file name) and sizes; clear errors otherwise."""
    if not path.exists():
        raise DiskError(f"VM disk {path} does not exist; check the image path in the spec")
    if not path.is_file():
        raise DiskError(f"VM disk {path} is not a regular file; give a raw or qcow2 disk image file")
    # -U: a disk other VMs have open (as a backing file) must still be readable.
    proc = subprocess.run([_qemu_img(), "info", "-U", "--output=json", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DiskError(f"qemu-img cannot read VM disk {path}: {proc.stderr.strip()}")
    data = json.loads(proc.stdout)
    _refuse_external_files(path, data)
    fmt = str(data.get("format", "unknown"))
    if fmt not in SUPPORTED_FORMATS:
        raise DiskError(
            f"VM disk {path} is in {fmt} format, which the vm runtime does not boot; convert it "
            f"with 'qemu-img convert -O qcow2 {path} {path.with_suffix('.qcow2')}'"
        )
    if fmt == "raw" and data.get("virtual-size", 0) < 512:
        raise DiskError(f"VM disk {path} is empty; give a disk image with a boot loader or file system")
    return DiskInfo(path, fmt, int(data.get("virtual-size", 0)), int(data.get("actual-size", 0)))


def _refuse_external_files(path: Path, info: dict[str, object]) -> None:
    """A disk that points at other files (a backing chain, a qcow2 data file) is refused.

    QEMU runs as root and follows those references itself, so a user's qcow2
    whose backing file is ``/etc/shadow`` would hand that file to the guest.
    uniframe boots a disk as one self-contained file under its own overlay.
    """
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    data_file = data.get("data-file") if isinstance(data, dict) else None
    for what, target in (("a backing file", backing), ("an external data file", data_file)):
        if target:
            raise DiskError(
                f"VM disk {path} refers to {what} ({target}), which QEMU would open as root: "
                f"flatten it into one file with 'qemu-img convert -O qcow2 {path} "
                f"{path.with_name(path.stem + '-flat.qcow2')}' and use that")


def create_overlay(backing: DiskInfo, overlay: Path) -> Path:
    """A qcow2 in ``overlay`` that reads from ``backing`` and keeps every write to itself."""
    overlay.unlink(missing_ok=True)
    proc = subprocess.run([_qemu_img(), "create", "-q", "-f", "qcow2", "-F", backing.format,
                           "-b", str(backing.path.resolve()), str(overlay)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DiskError(f"cannot create the overlay {overlay} over {backing.path}: {proc.stderr.strip()}")
    return overlay
