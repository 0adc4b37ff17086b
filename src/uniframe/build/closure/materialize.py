"""Copy a closure into a root directory, ready to be packed as an initramfs or a layer.

Three choices make the tree small, fast to boot and reproducible:

* Every ``.py`` gets a ``__pycache__`` pyc compiled as *unchecked-hash*. The
  initramfs sets every mtime to 0, so timestamp pycs would never match and
  Python would recompile every module at every boot (and fail to cache it on
  a read-only root); an unchecked-hash pyc is used as is. They are compiled
  in a separate interpreter (the closure's own, so the magic number matches)
  with ``PYTHONHASHSEED=0``: set and frozenset constants are marshalled in
  hash order, so a random seed would make the bytes differ between builds.
* ELF files are stripped with ``strip --strip-unneeded`` except the dynamic
  loader and auditwheel-repaired libraries (``<dist>.libs/``): patchelf moves
  their dynamic sections in ways binutils' strip rewrites into broken files.
* No timestamps: every mtime is set to 0, so the same closure gives the same
  bytes, modes and times, and a tree digest identifies an image.

Sources are kept by default (``sources=True``): the pycs make them unneeded
for running, but a traceback from inside a unikernel is often all one gets,
and without sources it has no code lines. ``sources=False`` ships
``mod.pyc`` in place of ``mod.py`` (the sourceless layout Python imports).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from uniframe.build.closure.model import ELF_KINDS, Closure, Entry
from uniframe.errors import BuildError

# Runs in the closure's interpreter: reads [[source, cfile, dfile], ...] on stdin.
_COMPILE = """
import json, py_compile, sys
mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
for source, cfile, dfile in json.load(sys.stdin):
    py_compile.compile(source, cfile=cfile, dfile=dfile, doraise=True, invalidation_mode=mode)
"""


@dataclass(frozen=True)
class MaterializeStats:
    files: int  # regular files in the tree, pycs included
    symlinks: int
    dirs: int
    pyc_files: int
    pyc_bytes: int
    source_bytes: int  # .py bytes shipped (0 with sources=False)
    elf_files: int
    stripped_files: int
    elf_bytes_before: int
    elf_bytes_after: int
    bytes_before_strip: int  # every regular file before stripping
    total_bytes: int  # every regular file in the finished tree


def never_strip(entry: Entry) -> bool:
    """The loader, and libraries auditwheel put in a ``<dist>.libs/`` directory."""
    if entry.kind == "loader":
        return True
    return any(part.endswith(".libs") for part in Path(entry.image_path).parent.parts)


def _inside(root: Path, image_path: str) -> Path:
    return root / image_path.lstrip("/")


def materialize(
    closure: Closure,
    root: Path,
    *,
    strip: bool = True,
    sources: bool = True,
    strip_tool: str = "strip",
) -> MaterializeStats:
    """Write ``closure`` under ``root`` (which must be absent or empty) at its image paths."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise BuildError(f"{root} is not empty: materialize into a new directory")
    root.mkdir(parents=True, exist_ok=True)
    compile_jobs: list[tuple[str, str, str]] = []
    to_strip: list[tuple[Entry, Path]] = []
    elf_before = 0
    source_bytes = 0
    for entry in closure.entries:
        dest = _inside(root, entry.image_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if entry.kind == "dir":
            dest.mkdir(exist_ok=True)
            continue
        if entry.kind == "symlink":
            assert entry.target is not None
            os.symlink(entry.target, dest)
            continue
        is_source = entry.kind == "python-module" and entry.image_path.endswith(".py")
        if is_source and not sources:
            staged = dest.with_name(dest.name + ".src")
            shutil.copyfile(entry.path, staged)
            compile_jobs.append((str(staged), str(dest.with_suffix(".pyc")), entry.image_path))
            continue
        shutil.copyfile(entry.path, dest)
        os.chmod(dest, entry.mode)
        if is_source:
            source_bytes += entry.size
            compile_jobs.append((str(dest), _cache_path(dest, closure.cache_tag), entry.image_path))
        if entry.kind in ELF_KINDS:
            elf_before += entry.size
            if strip and not never_strip(entry):
                to_strip.append((entry, dest))
    _compile(closure.interpreter, compile_jobs)
    for source, _cfile, _dfile in compile_jobs:
        if source.endswith(".src"):
            os.unlink(source)
    if to_strip:
        _strip(strip_tool, [d for _, d in to_strip])
        for entry, dest in to_strip:
            os.chmod(dest, entry.mode)
    pyc_files = 0
    pyc_bytes = 0
    for _source, cfile, _dfile in compile_jobs:
        os.chmod(cfile, 0o644)
        pyc_files += 1
        pyc_bytes += os.path.getsize(cfile)
    _dir_modes(closure, root)
    files, links, dirs, total = _zero_times(root)
    elf_after = sum(
        os.path.getsize(_inside(root, e.image_path)) for e in closure.entries if e.kind in ELF_KINDS)
    return MaterializeStats(
        files=files, symlinks=links, dirs=dirs, pyc_files=pyc_files, pyc_bytes=pyc_bytes,
        source_bytes=source_bytes, elf_files=sum(e.kind in ELF_KINDS for e in closure.entries),
        stripped_files=len(to_strip), elf_bytes_before=elf_before, elf_bytes_after=elf_after,
        bytes_before_strip=total + elf_before - elf_after, total_bytes=total,
    )


def _cache_path(source: Path, cache_tag: str) -> str:
    return str(source.parent / "__pycache__" / f"{source.stem}.{cache_tag}.pyc")


def _compile(python: str, jobs: list[tuple[str, str, str]]) -> None:
    if not jobs:
        return
    env = {"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [python, "-S", "-c", _COMPILE], input=json.dumps(jobs).encode(), env=env,
        capture_output=True, check=False,
    )
    if proc.returncode != 0:
        raise BuildError(
            f"compiling the closure's Python modules with {python} failed:\n"
            f"{proc.stderr.decode(errors='replace')[-2000:]}\n"
            "Check that the traced interpreter still exists and the sources are valid."
        )


def _strip(tool: str, paths: list[Path]) -> None:
    try:
        proc = subprocess.run([tool, "--strip-unneeded", "--", *map(str, paths)],
                              capture_output=True, check=False)
    except FileNotFoundError:
        raise BuildError(
            f"{tool} is not installed: install binutils, or materialize with strip=False"
        ) from None
    if proc.returncode != 0:
        raise BuildError(f"{tool} --strip-unneeded failed: {proc.stderr.decode(errors='replace')}")


def _dir_modes(closure: Closure, root: Path) -> None:
    """Give directories their host modes (0755 for those we made: __pycache__), whatever the umask."""
    modes = {str(_inside(root, e.image_path)): e.mode for e in closure.entries if e.kind == "dir"}
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, modes.get(path, 0o755))


def _zero_times(root: Path) -> tuple[int, int, int, int]:
    """Set every mtime under ``root`` to 0; return (files, symlinks, dirs, file bytes)."""
    files = links = dirs = total = 0
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                links += 1
            elif stat.S_ISDIR(st.st_mode):
                dirs += 1
            else:
                files += 1
                total += st.st_size
            os.utime(path, (0, 0), follow_symlinks=False)
    os.utime(root, (0, 0))
    return files, links, dirs, total


def tree_digest(root: Path) -> str:
    """A sha256 over every path, type, mode, mtime and content (or link target) under ``root``."""
    h = hashlib.sha256()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + dirnames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            h.update(f"{rel}\0{st.st_mode:o}\0{st.st_mtime_ns}\0".encode(errors="surrogateescape"))
            if stat.S_ISLNK(st.st_mode):
                h.update(os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            h.update(b"\0")
    return h.hexdigest()
