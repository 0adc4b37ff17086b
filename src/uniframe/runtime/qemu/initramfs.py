"""Just enough initramfs for the runtime's own tiny guests (the KVM probe, tests).

The image builder owns real initramfs images; the runtime only needs a one-file
archive (``/init`` plus ``/dev/console``), so it writes the ``newc`` cpio format
itself. Writing the archive in Python also means the device node needs no root
and no ``mknod`` on the host.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from uniframe.errors import RuntimeDriverError


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """A ``newc`` (SVR4, no CRC) cpio archive as the kernel unpacks it."""
    out = bytearray()
    all_entries = [*entries, CpioEntry("TRAILER!!!", 0)]
    for ino, entry in enumerate(all_entries, start=1):
        name = entry.name.encode() + b"\0"
        fields = (ino, entry.mode, 0, 0, 2 if stat.S_ISDIR(entry.mode) else 1, 0,
                  len(entry.data), 0, 0, entry.rdev[0], entry.rdev[1], len(name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


def init_initramfs(init: bytes) -> bytes:
    """An initramfs whose only program is ``/init``, with a console to write to."""
    return newc_archive([
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("proc", stat.S_IFDIR | 0o755),
        CpioEntry("init", stat.S_IFREG | 0o755, init),
    ])


def compile_static(source: str, flags: tuple[str, ...] = ()) -> bytes:
    """Compile one C file with ``gcc -static`` and return the stripped executable."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeDriverError("gcc not found; install it with 'apt-get install build-essential'")
    with tempfile.TemporaryDirectory(prefix="uniframe-cc-") as tmp:
        src = Path(tmp) / "init.c"
        exe = Path(tmp) / "init"
        src.write_text(source)
        proc = subprocess.run([gcc, "-static", "-Os", "-s", "-o", str(exe), str(src), *flags],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeDriverError(f"gcc -static failed (is libc6-dev installed?):\n{proc.stderr.strip()}")
        return exe.read_bytes()
