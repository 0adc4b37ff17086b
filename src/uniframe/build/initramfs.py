"""Initramfs archives: a deterministic ``newc`` cpio writer and the kernel's compressors.

Why write cpio ourselves instead of running ``cpio -o``: the archive must be
byte-for-byte reproducible (images are content-addressed), must hold device
nodes (``/dev/console``) without root or ``mknod`` on the host, and must not
leak the host's owners, timestamps, inode numbers or hardlinks. Every entry
here is owned by 0:0, has one fixed mtime, its own inode number and a link
count of 1 (the kernel's unpacker treats ``nlink >= 2`` as a hardlink), and
entries come in path order with each parent before its children (missing
parents are added as ``0755`` directories).

Compression, in the formats the kernel's initramfs decompressors accept
(``CONFIG_RD_*``):

- gzip: plain gzip, written with the ``gzip`` module and ``mtime=0`` (the
  header otherwise records the time and the file name);
- lz4: only the *legacy* frame format (``lz4 -l``); the kernel's ``unlz4``
  rejects the modern LZ4 frame format, which is the tool's default;
- zstd: the standard zstd frame (what the kernel's own ``usr/Makefile``
  produces with the ``zstd`` tool), with a window the kernel accepts at any
  level up to 19.

Files are streamed in chunks, so an image of hundreds of megabytes never sits
in memory.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import posixpath
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from uniframe.build.piped import feeding
from uniframe.errors import BuildError

Method = Literal["none", "gzip", "lz4", "zstd"]
METHODS: tuple[Method, ...] = ("none", "gzip", "lz4", "zstd")
SUFFIXES: dict[Method, str] = {"none": "", "gzip": ".gz", "lz4": ".lz4", "zstd": ".zst"}
# Balanced for build time on 2 cores against size; decompression speed at boot
# hardly depends on the level for any of the three.
DEFAULT_LEVELS: dict[Method, int] = {"none": 0, "gzip": 6, "lz4": 9, "zstd": 9}
LEVEL_RANGES: dict[Method, tuple[int, int]] = {
    "none": (0, 0), "gzip": (1, 9), "lz4": (1, 12), "zstd": (1, 19)}

TRAILER = "TRAILER!!!"
_MAGIC = b"070701"
_CHUNK = 1 << 20
_MAX_SIZE = 0xFFFFFFFF  # newc stores sizes in 8 hex digits


@dataclass(frozen=True)
class Directory:
    path: str
    mode: int = 0o755


@dataclass(frozen=True)
class File:
    """A regular file from a host path (streamed) or from bytes.

    ``mode`` None means the host file's permission bits (setuid, setgid and
    sticky bits dropped), or 0644 for bytes.
    """

    path: str
    source: Path | bytes
    mode: int | None = None


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str


@dataclass(frozen=True)
class Device:
    """A device node; ``kind`` is ``"c"`` (character) or ``"b"`` (block)."""

    path: str
    kind: Literal["c", "b"]
    major: int
    minor: int
    mode: int = 0o600


Entry = Directory | File | Symlink | Device


def archive_path(path: str) -> str:
    """The name as stored: relative to the archive root, normalised, no ``..``."""
    name = posixpath.normpath("/" + path).lstrip("/")
    if not name or name == "." or ".." in path.split("/"):
        raise ValueError(f"bad archive path {path!r}: expected a path below the root, without '..'")
    return name


def _sort_key(name: str) -> tuple[str, ...]:
    # Component-wise, so "a" < "a/b" < "a.b": a parent always precedes its children.
    return tuple(name.split("/"))


def plan(entries: Iterable[Entry]) -> list[tuple[str, Entry]]:
    """Entries by archive name, in archive order, with missing parent directories added.

    Raises ``ValueError`` for two different entries at one path, or an entry
    below a path that is not a directory.
    """
    by_name: dict[str, Entry] = {}
    for entry in entries:
        name = archive_path(entry.path)
        old = by_name.get(name)
        if old is not None and old != entry and not _same_directory(old, entry):
            raise ValueError(f"two different entries for {name!r}: {old!r} and {entry!r}")
        by_name[name] = entry
    for name in list(by_name):
        parent = posixpath.dirname(name)
        while parent:
            existing = by_name.get(parent)
            if existing is None:
                by_name[parent] = Directory(parent)
            elif not isinstance(existing, Directory):
                raise ValueError(f"{name!r} is inside {parent!r}, which is not a directory "
                                 f"in the archive ({existing!r})")
            parent = posixpath.dirname(parent)
    return sorted(by_name.items(), key=lambda item: _sort_key(item[0]))


def _same_directory(a: Entry, b: Entry) -> bool:
    return isinstance(a, Directory) and isinstance(b, Directory) and a.mode == b.mode


def _header(ino: int, mode: int, nlink: int, mtime: int, size: int, rdev: tuple[int, int],
            name: bytes) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = _MAGIC + b"".join(b"%08X" % f for f in fields) + name + b"\0"
    return head + _pad(len(head))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


class _Counter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.written = 0

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.written += len(data)


def write_cpio(entries: Iterable[Entry], out: BinaryIO, *, mtime: int = 0) -> int:
    """Write a ``newc`` archive of ``entries`` (plus parents and trailer); return its size.

    ``mtime`` is stamped on every entry (0, or the build's ``SOURCE_DATE_EPOCH``).
    Raises ``BuildError`` if a source file cannot be read or changes size
    while it is archived, ``ValueError`` for inconsistent entries.
    """
    if not 0 <= mtime <= _MAX_SIZE:
        raise ValueError(f"mtime {mtime} does not fit a newc header")
    w = _Counter(out)
    ino = 0
    for ino, (name, entry) in enumerate(plan(entries), start=1):
        raw = name.encode()
        if isinstance(entry, Directory):
            w.write(_header(ino, stat.S_IFDIR | _perm(entry.mode), 2, mtime, 0, (0, 0), raw))
        elif isinstance(entry, Symlink):
            target = entry.target.encode()
            w.write(_header(ino, stat.S_IFLNK | 0o777, 1, mtime, len(target), (0, 0), raw))
            w.write(target + _pad(len(target)))
        elif isinstance(entry, Device):
            kind = stat.S_IFCHR if entry.kind == "c" else stat.S_IFBLK
            w.write(_header(ino, kind | _perm(entry.mode), 1, mtime, 0,
                            (entry.major, entry.minor), raw))
        else:
            _write_file(w, ino, name, entry, mtime)
    w.write(_header(ino + 1, 0, 1, 0, 0, (0, 0), TRAILER.encode()))
    return w.written


def _perm(mode: int) -> int:
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {mode:o} is not a permission mode")
    return mode


def _write_file(w: _Counter, ino: int, name: str, entry: File, mtime: int) -> None:
    raw = name.encode()
    if isinstance(entry.source, bytes):
        data = entry.source
        mode = 0o644 if entry.mode is None else _perm(entry.mode)
        w.write(_header(ino, stat.S_IFREG | mode, 1, mtime, len(data), (0, 0), raw))
        w.write(data + _pad(len(data)))
        return
    # Errors of the source are the user's to fix (BuildError); errors of the sink
    # (a dead compressor) propagate as they are, for the caller to explain.
    src = entry.source
    try:
        # stat before open: opening a FIFO would block
        if not stat.S_ISREG(os.stat(src).st_mode):
            raise BuildError(f"{src} (for {name} in the initramfs) is not a regular file")
        f = open(src, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise _unreadable(src, name, exc) from None
    with f:
        st = os.fstat(f.fileno())
        if st.st_size > _MAX_SIZE:
            raise BuildError(f"{src} is {st.st_size} bytes; an initramfs entry holds at most 4 GiB - 1")
        mode = st.st_mode & 0o777 if entry.mode is None else _perm(entry.mode)
        w.write(_header(ino, stat.S_IFREG | mode, 1, mtime, st.st_size, (0, 0), raw))
        left = st.st_size
        while left and (chunk := _read(f, min(_CHUNK, left), src, name)):
            w.write(chunk)
            left -= len(chunk)
        if left or _read(f, 1, src, name):
            raise BuildError(f"{src} changed size while it was archived; "
                             "rebuild when nothing is writing to it")
    w.write(_pad(st.st_size))


def _read(f: BinaryIO, n: int, src: Path, name: str) -> bytes:
    try:
        return f.read(n)
    except OSError as exc:
        raise _unreadable(src, name, exc) from None


def _unreadable(src: Path, name: str, exc: OSError) -> BuildError:
    return BuildError(f"cannot read {src} (for {name} in the initramfs): {exc.strerror or exc}")


def check_level(method: Method, level: int | None) -> int:
    if method not in METHODS:
        raise BuildError(f"unknown initramfs compression {method!r}; use one of {', '.join(METHODS)}")
    if level is None:
        return DEFAULT_LEVELS[method]
    low, high = LEVEL_RANGES[method]
    if not low <= level <= high:
        raise BuildError(f"{method} level {level} is out of range; use {low}-{high}")
    return level


def _tool_argv(method: Literal["lz4", "zstd"], level: int) -> list[str]:
    tool = shutil.which(method)
    if tool is None:
        raise BuildError(f"'{method}' is not installed; install the Debian package {method} "
                         "(scripts/install.sh does), or choose gzip compression")
    if method == "lz4":
        return [tool, "-l", f"-{level}", "-q", "-c"]
    return [tool, f"-{level}", "-q", "-c", "-T0", "--no-progress"]


@contextlib.contextmanager
def compressor(out: BinaryIO, method: Method, level: int | None = None) -> Iterator[BinaryIO]:
    """A stream whose bytes reach ``out`` compressed for the kernel; closed on exit."""
    lvl = check_level(method, level)
    if method == "none":
        yield out
        return
    if method == "gzip":
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=lvl, mtime=0) as gz:
            yield gz  # type: ignore[misc]
        return
    with feeding(_tool_argv(method, lvl), method, stdout=out) as stdin:
        yield stdin  # type: ignore[misc]


def compress(path: Path, method: Method, level: int | None = None,
             out: Path | None = None) -> Path:
    """Compress the archive at ``path`` to ``out`` (default: ``path`` plus the method's suffix).

    ``none`` returns ``path`` unchanged. The output appears atomically.
    """
    check_level(method, level)
    if method == "none":
        return path
    dest = out if out is not None else path.with_name(path.name + SUFFIXES[method])
    with open(path, "rb") as src, _atomic(dest) as raw, compressor(raw, method, level) as sink:
        while chunk := src.read(_CHUNK):
            sink.write(chunk)
    return dest


def write_initramfs(entries: Iterable[Entry], dest: Path, method: Method = "gzip",
                    level: int | None = None, *, mtime: int = 0) -> Path:
    """Write ``entries`` as a compressed initramfs at ``dest`` in one streaming pass."""
    check_level(method, level)
    with _atomic(dest) as raw, compressor(raw, method, level) as sink:
        write_cpio(entries, sink, mtime=mtime)
    return dest


@contextlib.contextmanager
def _atomic(dest: Path) -> Iterator[BinaryIO]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
