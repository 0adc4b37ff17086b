"""Finding ``qemu-system-x86_64`` and its version (part of the accelerator cache key)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

from uniframe.errors import RuntimeDriverError


class QemuMissingError(RuntimeDriverError):
    """QEMU is not installed (or ``UNIFRAME_QEMU`` names nothing runnable)."""


def qemu_binary() -> str:
    """The QEMU system emulator to run; ``UNIFRAME_QEMU`` overrides the PATH lookup."""
    wanted = os.environ.get("UNIFRAME_QEMU", "qemu-system-x86_64")
    found = shutil.which(wanted)
    if found is None:
        raise QemuMissingError(
            f"{wanted} not found; install QEMU with 'apt-get install qemu-system-x86' "
            "(or run scripts/install.sh), or point UNIFRAME_QEMU at the binary"
        )
    return found


@functools.cache
def qemu_version(binary: str) -> str:
    """The first line of ``qemu --version``, e.g. ``QEMU emulator version 7.2.22 (...)``."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuMissingError(f"{binary} --version failed: {exc}") from None
    first = out.stdout.strip().splitlines()
    return first[0] if first else "unknown"
