"""Read-only root file systems: the unikernel's root as a squashfs image on a virtio-blk disk.

Why a disk root beside the initramfs: the kernel unpacks an initramfs into
RAM, so the whole root (94 MB for the iris service) stays resident in the
guest for its life, and QEMU keeps the compressed initrd mapped as well,
although the app only ever maps about a third of the root. From a read-only
block device the kernel reads, decompresses and caches only the blocks the app
touches, and there is no initrd: QEMU's RSS fell by ~70 MB in the measurements
(bench/README.md, "Unikernel").

Why squashfs: it is compressed, read-only by design, in the 6.1 kernel with
the decompressors the initramfs already uses (gzip, lz4, zstd, plus xz), and
``mksquashfs`` builds it without root, loop devices or mounts.

Why the entries reach ``mksquashfs`` as a tar stream (its ``-tar`` mode)
instead of a directory: the image holds exactly the entries the initramfs
writer would archive (:func:`uniframe.build.initramfs.plan` orders them and
adds parents), device nodes need no ``mknod`` on the host, and nothing of the
host leaks in: every entry is owned by 0:0 and carries one fixed mtime, the
root directory is 0755, the superblock time is the same mtime, there are no
extended attributes, and ``mksquashfs`` lays the image out reproducibly (its
default), whatever the number of threads. Same entries, same bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import IO, BinaryIO, Literal

from uniframe.build.initramfs import Device, Directory, Entry, File, Symlink, plan
from uniframe.build.piped import feeding
from uniframe.errors import BuildError

Method = Literal["none", "gzip", "lz4", "zstd", "xz"]
METHODS: tuple[Method, ...] = ("none", "gzip", "lz4", "zstd", "xz")
# lz4: levels 3 and up mean LZ4 HC (-Xhc), as with the lz4 tool; HC files decode just as fast.
# xz has no level in mksquashfs; 0 stands for its only setting.
LEVEL_RANGES: dict[Method, tuple[int, int]] = {
    "none": (0, 0), "gzip": (1, 9), "lz4": (1, 12), "zstd": (1, 22), "xz": (0, 0)}
DEFAULT_LEVELS: dict[Method, int] = {"none": 0, "gzip": 9, "lz4": 9, "zstd": 19, "xz": 0}
_LZ4_HC_FROM = 3
BLOCK_SIZES = tuple(1 << n for n in range(12, 21))  # 4 KiB .. 1 MiB, what squashfs allows
PACKAGE = "squashfs-tools"


def check_options(method: Method, level: int | None, block_size: int) -> int:
    """The level to use for ``method``; raises ``BuildError`` for values mksquashfs refuses."""
    if method not in METHODS:
        raise BuildError(f"unknown squashfs compression {method!r}; use one of {', '.join(METHODS)}")
    if block_size not in BLOCK_SIZES:
        sizes = ", ".join(_size_name(b) for b in BLOCK_SIZES)
        raise BuildError(f"squashfs block size {block_size} is not one of {sizes}")
    if level is None:
        return DEFAULT_LEVELS[method]
    low, high = LEVEL_RANGES[method]
    if not low <= level <= high:
        raise BuildError(f"squashfs {method} level {level} is out of range; use {low}-{high}")
    return level


def _size_name(block_size: int) -> str:
    return f"{block_size >> 20}M" if block_size >= 1 << 20 else f"{block_size >> 10}K"


def compressor_args(method: Method, level: int) -> list[str]:
    """The ``mksquashfs`` options for one compression method and level."""
    if method == "none":
        return ["-noI", "-noD", "-noF", "-noX"]
    args = ["-comp", method]
    if method in ("gzip", "zstd"):
        args += ["-Xcompression-level", str(level)]
    elif method == "lz4" and level >= _LZ4_HC_FROM:
        args.append("-Xhc")
    return args


def mksquashfs_argv(dest: Path, method: Method, level: int, block_size: int, mtime: int) -> list[str]:
    tool = shutil.which("mksquashfs")
    if tool is None:
        raise BuildError(f"'mksquashfs' is not installed; install the Debian package {PACKAGE} "
                         "(scripts/install.sh does), or build an initramfs image "
                         "(--rootfs initramfs)")
    return [tool, "-", str(dest), "-tar", "-noappend", "-quiet", "-no-progress", "-exit-on-error",
            "-b", _size_name(block_size), *compressor_args(method, level),
            "-all-root", "-root-mode", "0755", "-all-time", str(mtime), "-mkfs-time", str(mtime),
            "-no-xattrs", "-no-exports"]


def write_squashfs(entries: Iterable[Entry], dest: Path, method: Method = "zstd",
                   level: int | None = None, *, block_size: int = 1 << 17, mtime: int = 0) -> Path:
    """Write ``entries`` (plus missing parents) as a squashfs image at ``dest``, atomically.

    Raises ``BuildError`` if a source file cannot be read or changes size, or
    if ``mksquashfs`` is missing or fails; ``ValueError`` for inconsistent entries.
    """
    lvl = check_options(method, level, block_size)
    if not 0 <= mtime <= 0xFFFFFFFF:
        raise ValueError(f"mtime {mtime} does not fit a squashfs time stamp")
    planned = plan(entries)  # before starting anything: bad entries fail early
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _run_mksquashfs(planned, mksquashfs_argv(tmp, method, lvl, block_size, mtime), mtime)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _run_mksquashfs(planned: list[tuple[str, Entry]], argv: list[str], mtime: int) -> None:
    """Stream the tar of ``planned`` into ``mksquashfs -tar``; raise with its message on failure."""
    with feeding(argv, "mksquashfs") as stdin, tarfile.open(
            fileobj=stdin, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for name, entry in planned:
            _add(tar, name, entry, mtime)


def _info(name: str, kind: bytes, mode: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _add(tar: tarfile.TarFile, name: str, entry: Entry, mtime: int) -> None:
    if isinstance(entry, Directory):
        tar.addfile(_info(name, tarfile.DIRTYPE, _perm(entry.mode), mtime))
    elif isinstance(entry, Symlink):
        info = _info(name, tarfile.SYMTYPE, 0o777, mtime)
        info.linkname = entry.target
        tar.addfile(info)
    elif isinstance(entry, Device):
        info = _info(name, tarfile.CHRTYPE if entry.kind == "c" else tarfile.BLKTYPE,
                     _perm(entry.mode), mtime)
        info.devmajor, info.devminor = entry.major, entry.minor
        tar.addfile(info)
    else:
        _add_file(tar, name, entry, mtime)


def _perm(mode: int) -> int:
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {mode:o} is not a permission mode")
    return mode


def _add_file(tar: tarfile.TarFile, name: str, entry: File, mtime: int) -> None:
    if isinstance(entry.source, bytes):
        info = _info(name, tarfile.REGTYPE, 0o644 if entry.mode is None else _perm(entry.mode), mtime)
        info.size = len(entry.source)
        tar.addfile(info, BytesIO(entry.source))
        return
    src = entry.source
    with _open_source(src, name) as f:
        st = os.fstat(f.fileno())
        mode = st.st_mode & 0o777 if entry.mode is None else _perm(entry.mode)
        info = _info(name, tarfile.REGTYPE, mode, mtime)
        info.size = st.st_size
        try:
            tar.addfile(info, f)
            grew = bool(f.read(1))
        except OSError as exc:
            if isinstance(exc, BrokenPipeError):
                raise
            if "unexpected end of data" in str(exc):
                grew = True
            else:
                raise BuildError(f"cannot read {src} (for {name} in the root file system): "
                                 f"{exc.strerror or exc}") from None
        if grew:
            raise BuildError(f"{src} changed size while it was archived; "
                             "rebuild when nothing is writing to it")


@contextlib.contextmanager
def _open_source(src: Path, name: str) -> Iterator[BinaryIO]:
    try:
        # stat before open: opening a FIFO would block
        if not stat.S_ISREG(os.stat(src).st_mode):
            raise BuildError(f"{src} (for {name} in the root file system) is not a regular file")
        f: IO[bytes] = open(src, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise BuildError(f"cannot read {src} (for {name} in the root file system): "
                         f"{exc.strerror or exc}") from None
    with f:
        yield f  # type: ignore[misc]
