"""Read what the dynamic loader reads from an ELF file, and find libraries as it does.

A traced process shows which shared objects were mapped, but not the soname
links the loader walked to find them (``libz.so.1`` -> ``libz.so.1.2.13``),
nor libraries an executable would need that the trace did not load. Both come
from the dynamic section, so this module reads just that: the program headers,
``PT_INTERP`` and ``PT_DYNAMIC``. Writing the few dozen lines here keeps the
build host free of an ELF library and makes the loader's rules visible.
"""

from __future__ import annotations

import glob
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

ELF_MAGIC = b"\x7fELF"

ET_EXEC = 2
PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_STRSZ = 10
DT_SONAME = 14
DT_RPATH = 15
DT_RUNPATH = 29
DT_FLAGS_1 = 0x6FFFFFFB
DF_1_PIE = 0x08000000

# Where glibc's ld.so looks when nothing else (RPATH, LD_LIBRARY_PATH, RUNPATH,
# /etc/ld.so.cache) names the library: the "system search path" that
# `/lib64/ld-linux-x86-64.so.2 --help` prints on Debian x86_64. An image has
# no ld.so.cache, so a library must be found here or through a RUNPATH.
DEFAULT_DIRS: tuple[str, ...] = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib",
    "/usr/lib",
)
LD_SO_CONF = "/etc/ld.so.conf"
LD_SO_CACHE = "/etc/ld.so.cache"


@dataclass(frozen=True)
class ElfInfo:
    """The loader-relevant facts of one ELF file."""

    elf_class: int  # 1: 32-bit, 2: 64-bit
    machine: int
    elf_type: int
    interpreter: str | None
    needed: tuple[str, ...]
    soname: str | None
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]
    pie: bool

    @property
    def is_executable(self) -> bool:
        """A program the kernel can exec, as opposed to a library.

        glibc's own ``libc.so.6`` carries a PT_INTERP (it can be run to print
        its version), so an interpreter alone does not make a program: it
        must also be ET_EXEC, flagged PIE, or have no soname.
        """
        if self.interpreter is None:
            return False
        return self.elf_type == ET_EXEC or self.pie or self.soname is None


def is_elf(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def read_elf(path: str | Path) -> ElfInfo | None:
    """Parse ``path``'s headers and dynamic section; None if it is not a readable ELF file."""
    try:
        with open(path, "rb") as f:
            return _parse(f)
    except (OSError, struct.error, ValueError):
        return None


def _parse(f: BinaryIO) -> ElfInfo | None:
    ident = f.read(16)
    if len(ident) < 16 or ident[:4] != ELF_MAGIC:
        return None
    elf_class, data = ident[4], ident[5]
    if elf_class not in (1, 2) or data not in (1, 2):
        return None
    end = "<" if data == 1 else ">"
    wide = elf_class == 2
    header = f.read(48 if wide else 36)
    if wide:
        e_type, e_machine, _ver, _entry, e_phoff = struct.unpack(end + "HHIQQ", header[:24])
        e_phentsize, e_phnum = struct.unpack(end + "HH", header[38:42])
        ph_fmt = end + "IIQQQQQQ"
    else:
        e_type, e_machine, _ver, _entry, e_phoff = struct.unpack(end + "HHIII", header[:16])
        e_phentsize, e_phnum = struct.unpack(end + "HH", header[26:30])
        ph_fmt = end + "IIIIIIII"
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    interp: tuple[int, int] | None = None
    f.seek(e_phoff)
    table = f.read(e_phentsize * e_phnum)
    for i in range(e_phnum):
        raw = table[i * e_phentsize:(i + 1) * e_phentsize]
        if wide:
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _align = struct.unpack(
                ph_fmt, raw[:56])
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _flags, _align = struct.unpack(
                ph_fmt, raw[:32])
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == PT_INTERP:
            interp = (p_offset, p_filesz)
    interpreter = None
    if interp is not None:
        f.seek(interp[0])
        interpreter = f.read(interp[1]).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    tags: list[tuple[int, int]] = []
    if dynamic is not None:
        f.seek(dynamic[0])
        blob = f.read(dynamic[1])
        entry = struct.Struct(end + ("qQ" if wide else "iI"))
        for off in range(0, len(blob) - entry.size + 1, entry.size):
            tag, val = entry.unpack_from(blob, off)
            if tag == DT_NULL:
                break
            tags.append((tag, val))
    strtab = next((v for t, v in tags if t == DT_STRTAB), None)
    strsz = next((v for t, v in tags if t == DT_STRSZ), 0)
    strings = b""
    if strtab is not None:
        for vaddr, offset, filesz in loads:
            if vaddr <= strtab < vaddr + filesz:
                f.seek(offset + strtab - vaddr)
                strings = f.read(strsz)
                break

    def text(off: int) -> str:
        return strings[off:strings.index(b"\0", off)].decode("utf-8", "surrogateescape")

    def paths(tag: int) -> tuple[str, ...]:
        out: list[str] = []
        for t, v in tags:
            if t == tag:
                out += [p for p in text(v).split(":") if p]
        return tuple(out)

    return ElfInfo(
        elf_class=elf_class,
        machine=e_machine,
        elf_type=e_type,
        interpreter=interpreter,
        needed=tuple(text(v) for t, v in tags if t == DT_NEEDED),
        soname=next((text(v) for t, v in tags if t == DT_SONAME), None),
        rpath=paths(DT_RPATH),
        runpath=paths(DT_RUNPATH),
        pie=any(t == DT_FLAGS_1 and v & DF_1_PIE for t, v in tags),
    )


def ld_so_conf_dirs(conf: str = LD_SO_CONF) -> list[str]:
    """The directories ``ldconfig`` puts in ``/etc/ld.so.cache``, in file order."""
    out: list[str] = []
    seen: set[str] = set()

    def walk(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            return
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("hwcap"):
                continue
            if line.startswith("include"):
                pattern = line.split(None, 1)[1] if " " in line or "\t" in line else ""
                if pattern and not pattern.startswith("/"):
                    pattern = os.path.join(os.path.dirname(path), pattern)
                for inc in sorted(glob.glob(pattern)):
                    walk(inc)
            elif line.startswith("/") and line not in out:
                out.append(line)

    walk(conf)
    return out


def expand_origin(entries: Iterable[str], origin: str) -> list[str]:
    """Substitute ``$ORIGIN``/``${ORIGIN}`` (the directory of the object that asks)."""
    out = []
    for e in entries:
        e = e.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
        out.append(os.path.normpath(e))
    return out


@dataclass(frozen=True)
class Found:
    """Where a library was found, and by which rule (``via`` names the loader's step)."""

    path: str
    via: str  # "rpath", "env", "runpath", "cache", "default", "path"


class LibrarySearch:
    """Resolve DT_NEEDED names in glibc ld.so's order.

    The order is DT_RPATH (only when the object has no DT_RUNPATH, and the
    main program's RPATH after the object's), LD_LIBRARY_PATH, DT_RUNPATH,
    the ld.so.cache (modelled by the ld.so.conf directories), then the
    system search path. A candidate whose class or machine differs from the
    asking object is skipped, as the loader does with 32-bit libraries.
    """

    def __init__(
        self,
        *,
        ld_library_path: Sequence[str] = (),
        cache_dirs: Sequence[str] | None = None,
        default_dirs: Sequence[str] = DEFAULT_DIRS,
    ) -> None:
        self.ld_library_path = [d for d in ld_library_path if d]
        self.cache_dirs = list(ld_so_conf_dirs() if cache_dirs is None else cache_dirs)
        self.default_dirs = list(default_dirs)
        self._info: dict[str, ElfInfo | None] = {}

    def info(self, path: str) -> ElfInfo | None:
        if path not in self._info:
            self._info[path] = read_elf(path)
        return self._info[path]

    def find(
        self,
        name: str,
        *,
        requester: str | None = None,
        program: str | None = None,
    ) -> Found | None:
        """Find library ``name`` needed by the ELF file ``requester`` of program ``program``."""
        asking = self.info(requester) if requester else None
        if "/" in name:
            return Found(name, "path") if os.path.exists(name) else None
        steps: list[tuple[str, list[str]]] = []
        if asking is not None and requester is not None:
            origin = os.path.dirname(os.path.realpath(requester))
            if not asking.runpath:
                rpath = expand_origin(asking.rpath, origin)
                prog = self.info(program) if program else None
                if prog is not None and program is not None and not prog.runpath:
                    rpath += expand_origin(prog.rpath, os.path.dirname(os.path.realpath(program)))
                steps.append(("rpath", rpath))
            steps.append(("env", self.ld_library_path))
            steps.append(("runpath", expand_origin(asking.runpath, origin)))
        else:
            steps.append(("env", self.ld_library_path))
        steps.append(("cache", self.cache_dirs))
        steps.append(("default", self.default_dirs))
        for via, dirs in steps:
            for d in dirs:
                candidate = os.path.join(d, name)
                if not os.path.isfile(candidate):
                    continue
                got = self.info(candidate)
                if got is None:
                    continue
                if asking is not None and (got.elf_class, got.machine) != (
                        asking.elf_class, asking.machine):
                    continue
                if via == "cache" and d in self.default_dirs:
                    via = "default"  # found without the cache too
                return Found(candidate, via)
        return None
