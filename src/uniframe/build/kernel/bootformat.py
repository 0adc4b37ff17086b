"""Telling which boot protocol QEMU will use for a kernel file.

QEMU's ``-kernel`` accepts two kinds of x86 kernel: a bzImage (the Linux boot
protocol, a decompressor in front of the compressed kernel) and an ELF
``vmlinux`` carrying a Xen PVH entry note (loaded as is and entered in 32-bit
mode, no decompression). Anything else fails late and obscurely inside QEMU,
so user-supplied kernels are recognised here first.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Literal

from uniframe.errors import BuildError

BootProtocol = Literal["pvh", "bzimage"]

_ELF_MAGIC = b"\x7fELF"
_EM_X86_64 = 62
_PT_NOTE = 4
# XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit PVH entry point QEMU looks for.
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def boot_protocol(path: Path) -> BootProtocol:
    """Return how QEMU boots ``path``; raise :class:`BuildError` saying why it cannot."""
    try:
        with path.open("rb") as f:
            head = f.read(0x240)
            if head.startswith(_ELF_MAGIC):
                if not has_pvh_note(path):
                    raise BuildError(
                        f"{path} is an ELF file without a PVH entry note, so QEMU cannot boot "
                        "it directly: build the kernel with CONFIG_PVH=y, or pass its "
                        "arch/x86/boot/bzImage instead")
                return "pvh"
    except OSError as exc:
        raise BuildError(f"cannot read kernel {path}: {exc.strerror}") from None
    if len(head) >= 0x206 and head[0x1FE:0x200] == b"\x55\xaa" and head[0x202:0x206] == b"HdrS":
        return "bzimage"
    raise BuildError(
        f"{path} is neither a bzImage nor an ELF vmlinux: pass arch/x86/boot/bzImage or a "
        "vmlinux built with CONFIG_PVH=y (or build one with `uniframe kernel build`)")


def has_pvh_note(path: Path) -> bool:
    """Whether ``path`` is a 64-bit x86 ELF whose PT_NOTE segments hold the PVH entry."""
    data = path.read_bytes()
    if len(data) < 64 or not data.startswith(_ELF_MAGIC) or data[4] != 2 or data[5] != 1:
        return False  # not ELF64 little-endian
    (machine,) = struct.unpack_from("<H", data, 0x12)
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    if machine != _EM_X86_64:
        return False
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(data):
            return False
        p_type, _flags, offset = struct.unpack_from("<IIQ", data, base)
        (filesz,) = struct.unpack_from("<Q", data, base + 32)
        if p_type == _PT_NOTE and _notes_have_pvh(data[offset:offset + filesz]):
            return True
    return False


def _notes_have_pvh(notes: bytes) -> bool:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, pos)
        name_start = pos + 12
        name = notes[name_start:name_start + namesz].rstrip(b"\0")
        if name == b"Xen" and kind == _XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        pos = name_start + _align4(namesz) + _align4(descsz)
    return False


def _align4(n: int) -> int:
    return (n + 3) & ~3
