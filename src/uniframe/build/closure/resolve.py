"""Turn a raw trace into a closure: real files, the links that lead to them, their ELF needs.

The image keeps host paths, so every path must resolve in the image exactly
as it did on the host: each symlink met on the way to a file (``/lib`` ->
``usr/lib`` on a merged-/usr system, ``libz.so.1`` -> ``libz.so.1.2.13``,
``bin/python`` -> ``python3.11``) is kept as a symlink, and every directory
on the way as a directory. The trace saw the libraries that were mapped, not
the names the loader asked for, so each ELF file's DT_NEEDED entries are
resolved again here in the loader's order, down to the dynamic loader itself.
"""

from __future__ import annotations

import glob
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniframe.build.closure.elf import LD_SO_CACHE, LibrarySearch, is_elf, read_elf
from uniframe.build.closure.model import Closure, Entry, Kind, sorted_entries
from uniframe.build.closure.packages import PackageIndex
from uniframe.errors import BuildError

# Kernel-provided trees: the guest mounts them, they are never copied.
PSEUDO_ROOTS = ("/proc", "/sys", "/dev")
_EXTENSION = re.compile(r"\.(cpython-\d+[^/]*|abi3)\.so$")
_MAX_LINKS = 40


@dataclass(frozen=True)
class TraceRecord:
    """What ``_tracer`` wrote, typed. Paths are as the app named them."""

    tracer: str
    executable: str
    prefixes: tuple[str, ...]
    stdlib_dir: str
    dynload_dir: str
    cache_tag: str
    path: tuple[str, ...]
    site_dirs: tuple[str, ...]
    cwd: str
    ld_library_path: tuple[str, ...]
    exec_path: tuple[str, ...]
    modules: Mapping[str, str | None]
    namespace_dirs: tuple[str, ...]
    opens: tuple[str, ...]
    writes: tuple[str, ...]
    listed: tuple[str, ...]
    dlopens: tuple[str, ...]
    spawns: tuple[str, ...]
    maps: tuple[str, ...]
    exit_code: int | None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TraceRecord:
        def strings(key: str) -> tuple[str, ...]:
            return tuple(str(v) for v in raw.get(key) or ())

        dynload = os.path.join(
            raw["base_exec_prefix"], raw["platlibdir"], f"python{raw['version']}", "lib-dynload")
        return cls(
            tracer=raw["tracer"],
            executable=raw["executable"],
            prefixes=tuple(raw[k] for k in ("prefix", "base_prefix", "exec_prefix", "base_exec_prefix")),
            stdlib_dir=raw["stdlib_dir"],
            dynload_dir=dynload,
            cache_tag=raw["cache_tag"],
            path=strings("path"),
            site_dirs=strings("site_dirs"),
            cwd=raw["cwd"],
            ld_library_path=tuple(p for p in raw.get("ld_library_path", "").split(":") if p),
            exec_path=tuple(p for p in raw.get("exec_path", "").split(":") if p),
            modules=dict(raw.get("modules") or {}),
            namespace_dirs=strings("namespace_dirs"),
            opens=strings("opens"),
            writes=strings("writes"),
            listed=strings("listed"),
            dlopens=strings("dlopens"),
            spawns=strings("spawns"),
            maps=strings("maps"),
            exit_code=raw.get("exit_code"),
        )


class _Tree:
    """The paths collected so far, each walked from ``/`` so links on the way are kept."""

    def __init__(self, started_ns: int | None = None) -> None:
        self.nodes: dict[str, str | None] = {}  # path -> symlink target, or None (file or dir)
        self.files: list[str] = []  # regular files, in the order they were found
        self.started_ns = started_ns
        self.modified: set[str] = set()  # files changed while the app ran: its output

    def add(self, path: str, depth: int = 0) -> str | None:
        """Keep ``path`` and every link and directory leading to it; return its real path."""
        if depth > _MAX_LINKS:
            return None
        comps = [c for c in path.split("/") if c and c != "."]
        cur = "/"
        new_dirs: list[str] = []  # dropped again if the path turns out to be the app's output
        for i, comp in enumerate(comps):
            if comp == "..":
                cur = os.path.dirname(cur)
                continue
            nxt = os.path.join(cur, comp)
            try:
                st = os.lstat(nxt)
            except OSError:
                return None
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(nxt)
                self.nodes[nxt] = target
                base = target if target.startswith("/") else os.path.join(cur, target)
                return self.add("/".join([base, *comps[i + 1:]]), depth + 1)
            if stat.S_ISREG(st.st_mode) and i == len(comps) - 1:
                if self.started_ns is not None and st.st_mtime_ns >= self.started_ns:
                    self.modified.add(nxt)
                    for d in new_dirs:
                        del self.nodes[d]
                    return None
                if nxt not in self.nodes:
                    self.nodes[nxt] = None
                    self.files.append(nxt)
            elif stat.S_ISDIR(st.st_mode):
                if nxt not in self.nodes:
                    self.nodes[nxt] = None
                    new_dirs.append(nxt)
            else:
                return None  # a device, socket or fifo, or a file used as a directory
            cur = nxt
        return cur


def _pseudo(path: str) -> bool:
    return any(path == r or path.startswith(r + "/") for r in PSEUDO_ROOTS)


def _source_of_pyc(path: str, cache_tag: str) -> str | None:
    """``pkg/__pycache__/mod.cpython-311.pyc`` -> ``pkg/mod.py`` (None if it is not such a pyc)."""
    head, name = os.path.split(path)
    if os.path.basename(head) != "__pycache__" or not name.endswith(".pyc"):
        return None
    stem = name.split(".", 1)[0]
    if f".{cache_tag}." not in name:
        return None
    return os.path.join(os.path.dirname(head), stem + ".py")


def _find_program(name: str, dirs: Iterable[str]) -> str | None:
    for d in dirs:
        candidate = os.path.join(d, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def resolve(
    record: TraceRecord,
    *,
    argv: Sequence[str] = (),
    trace_seconds: float = 0.0,
    extra_files: Sequence[Path] = (),
    started_ns: int | None = None,
    search: LibrarySearch | None = None,
) -> Closure:
    """Build the closure of a traced run (plus ``extra_files``, kept at their own paths).

    ``started_ns`` is the wall-clock time the app started: a file modified
    since then was written by the app (perhaps from C code, which the audit
    hook does not see, like onnxruntime's telemetry database) and is left out.
    """
    search = search or LibrarySearch(ld_library_path=record.ld_library_path)
    tree = _Tree(started_ns)
    notes: list[str] = []

    def absolute(p: str) -> str:
        return p if p.startswith("/") else os.path.join(record.cwd, p)

    written = {
        os.path.realpath(absolute(w)) for w in record.writes
        if _source_of_pyc(absolute(w).rsplit(".pyc", 1)[0] + ".pyc", record.cache_tag) is None
    }
    excluded = written | {os.path.realpath(record.tracer)}

    def add(p: str) -> str | None:
        p = absolute(p)
        if _pseudo(p) or _pseudo(os.path.realpath(p)) or os.path.realpath(p) in excluded:
            return None
        return tree.add(p)

    executable = add(record.executable)
    if executable is None:
        raise BuildError(f"the traced interpreter {record.executable} is not a file on this host")
    # A virtual environment's interpreter finds its prefix (and so its site-packages)
    # through pyvenv.cfg beside or above it, read before any audit hook can see it.
    venv_bin = os.path.dirname(absolute(record.executable))
    for cfg in (os.path.join(venv_bin, "pyvenv.cfg"), os.path.join(os.path.dirname(venv_bin), "pyvenv.cfg")):
        if os.path.isfile(cfg):
            add(cfg)
            break
    module_files: set[str] = set()
    for _name, file in sorted(record.modules.items()):
        if not file:
            continue  # builtin
        real = add(file)
        if real is not None:
            module_files.add(real)
    for d in record.namespace_dirs:
        add(d)
    for p in record.opens:
        source = _source_of_pyc(absolute(p), record.cache_tag)
        if source is not None:
            if os.path.isfile(source):
                real = add(source)
                if real is not None:
                    module_files.add(real)
            continue  # a pyc without its source is dead: import never reads it
        add(p)
    for d in record.listed:
        add(d)
    for name in record.dlopens:
        if "/" in name:
            add(name)
        else:
            found = search.find(name, program=executable)
            if found is None:
                notes.append(f"ctypes loaded {name}, which is not found in the library path")
            else:
                add(found.path)
    for prog in record.spawns:
        path = prog if "/" in prog else _find_program(prog, record.exec_path)
        if path is None:
            notes.append(f"the app ran {prog}, which is not on PATH")
        else:
            add(path)
    for p in record.maps:
        add(p)
    for site in record.site_dirs:
        # .pth files run before the trace starts and can put entries on sys.path
        # (an editable install's checkout): the image must start the same way.
        for pth in sorted(glob.glob(os.path.join(glob.escape(site), "*.pth"))):
            add(pth)
    # getpath finds sys.prefix by these landmarks, whether or not os.py was opened.
    add(os.path.join(record.stdlib_dir, "os.py"))
    add(record.dynload_dir)
    for extra in extra_files:
        if add(str(Path(extra).absolute())) is None:
            raise BuildError(
                f"extra file {extra} does not exist (or is written by the app); "
                "give the path of a file to copy into the image")

    loaders, need_cache = _add_elf_dependencies(tree, search, executable, notes)
    if need_cache:
        add(LD_SO_CACHE)
        notes.append(f"{LD_SO_CACHE} is included: a library was found only through ld.so.conf")

    index = PackageIndex(
        prefixes=record.prefixes,
        stdlib_dir=record.stdlib_dir,
        site_dirs=record.site_dirs,
        path_entries=[absolute(p) for p in record.path if p],
    )
    entries = [_entry(p, target, index, loaders, module_files) for p, target in tree.nodes.items()]
    pseudo = sorted({absolute(p) for p in (*record.opens, *record.listed) if _pseudo(absolute(p))})
    return Closure(
        entries=sorted_entries(entries),
        interpreter=record.executable,
        cache_tag=record.cache_tag,
        argv=tuple(argv),
        trace_seconds=round(trace_seconds, 3),
        writes=tuple(sorted(written | tree.modified)),
        pseudo_paths=tuple(pseudo),
        notes=tuple(notes),
    )


def _add_elf_dependencies(
    tree: _Tree, search: LibrarySearch, program: str, notes: list[str],
) -> tuple[set[str], bool]:
    """Add every ELF file's interpreter and DT_NEEDED libraries, transitively."""
    loaders: set[str] = set()
    need_cache = False
    done = 0
    while done < len(tree.files):
        path = tree.files[done]
        done += 1
        if not is_elf(path):
            continue
        info = search.info(path)
        if info is None:
            continue
        if info.interpreter:
            real = tree.add(info.interpreter)
            if real is None:
                notes.append(f"{path} asks for the loader {info.interpreter}, which is missing")
            else:
                loaders.add(real)
        for name in info.needed:
            found = search.find(name, requester=path, program=program)
            if found is None:
                notes.append(f"{name}, needed by {path}, is not found in the library path")
                continue
            need_cache |= found.via == "cache"
            tree.add(found.path)
    return loaders, need_cache


def _entry(
    path: str,
    target: str | None,
    index: PackageIndex,
    loaders: set[str],
    module_files: set[str],
) -> Entry:
    st = os.lstat(path)
    kind: Kind
    size = 0
    if target is not None:
        kind = "symlink"
        size = len(os.fsencode(target))
        package = index.package_of(os.path.realpath(path))
    elif stat.S_ISDIR(st.st_mode):
        kind = "dir"
        package = index.package_of(path)
    else:
        size = st.st_size
        package = index.package_of(path)
        kind = _file_kind(path, loaders, module_files)
    return Entry(path=path, image_path=path, kind=kind, size=size,
                 mode=stat.S_IMODE(st.st_mode), package=package, target=target)


def _file_kind(path: str, loaders: set[str], module_files: set[str]) -> Kind:
    if path in loaders:
        return "loader"
    if is_elf(path):
        if path in module_files or _EXTENSION.search(path):
            return "extension"
        info = read_elf(path)
        return "executable" if info is not None and info.is_executable else "shared-lib"
    if path.endswith(".py") or (path.endswith(".pyc") and path in module_files):
        return "python-module"
    return "data"
