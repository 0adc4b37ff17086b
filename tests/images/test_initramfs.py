"""The initramfs writer against the real tools: GNU cpio, gzip, lz4, zstd (and the kernel, if built)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import pytest

from uniframe.build.initramfs import (
    Device,
    Directory,
    Entry,
    File,
    Symlink,
    compress,
    plan,
    write_cpio,
    write_initramfs,
)
from uniframe.errors import BuildError


@pytest.fixture
def tree(tmp_path: Path) -> list[Entry]:
    src = tmp_path / "src"
    src.mkdir()
    tool = src / "tool"
    tool.write_bytes(b"#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    odd = src / "odd"
    odd.write_bytes(bytes(range(256)) * 3 + b"x")  # 769 bytes: needs padding
    odd.chmod(0o640)
    return [
        File("/init", b"#!/usr/bin/python3 -IBS\nprint('hi')\n", mode=0o755),
        File("/usr/bin/tool", tool),
        File("/usr/share/odd", odd),
        File("/etc/empty", b""),
        Symlink("/lib64", "usr/lib64"),
        Symlink("/usr/lib64/ld-linux-x86-64.so.2", "../lib/x86_64-linux-gnu/ld-2.36.so"),
        Directory("/proc"),
        Directory("/tmp", 0o1777),
        Device("/dev/console", "c", 5, 1),
        Device("/dev/null", "c", 1, 3, 0o666),
    ]


def archive(entries: Sequence[Entry], mtime: int = 0) -> bytes:
    buf = io.BytesIO()
    size = write_cpio(entries, buf, mtime=mtime)
    assert size == len(buf.getvalue())
    return buf.getvalue()


def read_newc(data: bytes) -> list[dict[str, int | str | bytes]]:
    """An independent reader of the newc format, to check the header fields exactly."""
    names = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor",
             "devminor", "rdevmajor", "rdevminor", "namesize", "check")
    out: list[dict[str, int | str | bytes]] = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = {n: int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i, n in enumerate(names)}
        namesize = int(fields["namesize"])
        name = data[pos + 110:pos + 110 + namesize]
        assert name.endswith(b"\0")
        pos += 110 + namesize
        pos += -pos % 4
        size = int(fields["filesize"])
        entry: dict[str, int | str | bytes] = {**fields, "name": name[:-1].decode(),
                                               "data": data[pos:pos + size]}
        pos += size
        pos += -pos % 4
        out.append(entry)
        if entry["name"] == "TRAILER!!!":
            assert pos == len(data)
            return out


def test_cpio_extracts_files_modes_and_symlinks(tree: list[Entry], tmp_path: Path) -> None:
    data = archive(tree)
    out = tmp_path / "out"
    out.mkdir()
    no_dev = [e for e in tree if not isinstance(e, Device)]
    proc = subprocess.run(["cpio", "-idmv", "--no-absolute-filenames"], input=archive(no_dev),
                          cwd=out, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (out / "init").read_bytes() == b"#!/usr/bin/python3 -IBS\nprint('hi')\n"
    assert stat.S_IMODE((out / "init").stat().st_mode) == 0o755
    assert (out / "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((out / "usr/bin/tool").stat().st_mode) == 0o755
    assert (out / "usr/share/odd").read_bytes() == bytes(range(256)) * 3 + b"x"
    assert stat.S_IMODE((out / "usr/share/odd").stat().st_mode) == 0o640
    assert (out / "etc/empty").read_bytes() == b""
    assert os.readlink(out / "lib64") == "usr/lib64"
    assert os.readlink(out / "usr/lib64/ld-linux-x86-64.so.2") == "../lib/x86_64-linux-gnu/ld-2.36.so"
    assert stat.S_IMODE((out / "tmp").stat().st_mode) == 0o1777
    assert (out / "proc").is_dir()
    assert (out / "usr/share/odd").stat().st_mtime == 0

    # The listing shows the device nodes and the owners without needing mknod.
    listing = subprocess.run(["cpio", "-itv"], input=data, capture_output=True, check=True)
    lines = listing.stdout.decode().splitlines()
    console = next(line for line in lines if line.endswith(" dev/console"))
    assert console.startswith("crw-------") and " 5,   1 " in console
    null = next(line for line in lines if line.endswith(" dev/null"))
    assert null.startswith("crw-rw-rw-") and " 1,   3 " in null
    assert all(" root     root " in line for line in lines), lines


@pytest.mark.root
def test_cpio_as_root_creates_device_nodes(tree: list[Entry], tmp_path: Path) -> None:
    subprocess.run(["cpio", "-id", "--no-absolute-filenames"], input=archive(tree), cwd=tmp_path,
                   check=True, capture_output=True)
    st = (tmp_path / "dev/console").stat()
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 1)


def test_headers_order_and_padding(tree: list[Entry]) -> None:
    entries = read_newc(archive(tree, mtime=1_700_000_000))
    names = [e["name"] for e in entries]
    assert names[-1] == "TRAILER!!!"
    # Parents come first, automatically added, in component order.
    assert names[:-1] == ["dev", "dev/console", "dev/null", "etc", "etc/empty", "init", "lib64",
                          "proc", "tmp", "usr", "usr/bin", "usr/bin/tool", "usr/lib64",
                          "usr/lib64/ld-linux-x86-64.so.2", "usr/share", "usr/share/odd"]
    body = entries[:-1]
    assert len({e["ino"] for e in entries}) == len(entries)
    for e in body:
        assert (e["uid"], e["gid"], e["check"], e["mtime"]) == (0, 0, 0, 1_700_000_000)
        mode = int(e["mode"])
        assert e["nlink"] == (2 if stat.S_ISDIR(mode) else 1)
    by_name = {e["name"]: e for e in entries}
    assert stat.S_ISDIR(int(by_name["usr/bin"]["mode"]))
    assert stat.S_IMODE(int(by_name["usr/bin"]["mode"])) == 0o755
    assert stat.S_ISLNK(int(by_name["lib64"]["mode"])) and by_name["lib64"]["data"] == b"usr/lib64"
    assert (by_name["dev/console"]["rdevmajor"], by_name["dev/console"]["rdevminor"]) == (5, 1)
    assert by_name["usr/share/odd"]["filesize"] == 769


def test_same_input_same_bytes_whatever_the_host_metadata(tree: list[Entry], tmp_path: Path) -> None:
    first = archive(tree)
    tool = tmp_path / "src/tool"
    os.utime(tool, (1_234_567, 1_234_567))
    if os.geteuid() == 0:
        os.chown(tool, 1234, 5678)
    assert archive(list(reversed(tree))) == first
    assert hashlib.sha256(archive(tree)).hexdigest() == hashlib.sha256(first).hexdigest()
    assert archive(tree, mtime=1) != first


def test_setuid_bits_of_host_files_are_dropped(tmp_path: Path) -> None:
    f = tmp_path / "su"
    f.write_bytes(b"x")
    f.chmod(0o4755)
    (entry,) = [e for e in read_newc(archive([File("bin/su", f)])) if e["name"] == "bin/su"]
    assert stat.S_IMODE(int(entry["mode"])) == 0o755


def test_bad_entries_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="two different entries"):
        plan([File("a", b"1"), File("/a", b"2")])
    with pytest.raises(ValueError, match="not a directory"):
        plan([File("a", b"1"), File("a/b", b"2")])
    with pytest.raises(ValueError, match="not a directory"):
        plan([Symlink("lib64", "usr/lib"), File("lib64/x", b"")])
    with pytest.raises(ValueError, match=r"without '\.\.'"):
        plan([File("../etc/passwd", b"")])
    with pytest.raises(ValueError, match="below the root"):
        plan([Directory("/")])
    # The same directory twice (from two sources of entries) is fine.
    assert [n for n, _ in plan([Directory("a"), Directory("/a/"), File("a/x", b"")])] == ["a", "a/x"]
    with pytest.raises(BuildError, match=r"cannot read .*missing"):
        archive([File("x", tmp_path / "missing")])
    with pytest.raises(BuildError, match="not a regular file"):
        archive([File("x", tmp_path)])
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(BuildError, match="not a regular file"):
        archive([File("x", tmp_path / "fifo")])


def test_large_files_are_streamed(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(300 << 20)  # sparse: 300 MiB to read, nothing to write
        f.seek(-5, os.SEEK_END)
        f.write(b"tail!")

    class Sink(io.RawIOBase):
        def __init__(self) -> None:
            self.n = 0
            self.last = b""

        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            self.n += len(b)
            self.last = (self.last + bytes(b))[-16:]
            return len(b)

    sink = Sink()
    tracemalloc.start()
    try:
        size = write_cpio([File("big", big)], sink)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == sink.n > 300 << 20
    assert peak < 8 << 20, f"peak Python memory {peak} bytes: the file was not streamed"


@pytest.mark.parametrize("method", ["gzip", "lz4", "zstd"])
def test_compression_round_trips_with_the_real_tools(method: str, tree: list[Entry],
                                                     tmp_path: Path) -> None:
    raw = tmp_path / "initramfs.cpio"
    raw.write_bytes(archive(tree))
    out = compress(raw, method)  # type: ignore[arg-type]
    assert out.name == "initramfs.cpio" + {"gzip": ".gz", "lz4": ".lz4", "zstd": ".zst"}[method]
    blob = out.read_bytes()
    tool = {"gzip": ["gzip", "-dc"], "lz4": ["lz4", "-dc"], "zstd": ["zstd", "-dc"]}[method]
    assert subprocess.run([*tool, str(out)], capture_output=True, check=True).stdout == raw.read_bytes()
    if method == "gzip":
        # no time, no file name: FLG has no FNAME bit, MTIME is zero
        assert blob[:3] == b"\x1f\x8b\x08" and blob[3] & 0x08 == 0 and blob[4:8] == b"\0\0\0\0"
    if method == "lz4":
        assert blob[:4] == (0x184C2102).to_bytes(4, "little"), "the kernel reads only legacy lz4"
    if method == "zstd":
        assert blob[:4] == (0xFD2FB528).to_bytes(4, "little")
    # Same input, same bytes; and the one-pass writer gives the same archive.
    again = compress(raw, method, out=tmp_path / "again")  # type: ignore[arg-type]
    assert again.read_bytes() == blob
    streamed = write_initramfs(tree, tmp_path / "streamed", method)  # type: ignore[arg-type]
    assert streamed.read_bytes() == blob


def test_no_compression_and_bad_choices(tree: list[Entry], tmp_path: Path) -> None:
    raw = tmp_path / "a.cpio"
    raw.write_bytes(archive(tree))
    assert compress(raw, "none") == raw
    assert write_initramfs(tree, tmp_path / "b.cpio", "none").read_bytes() == raw.read_bytes()
    with pytest.raises(BuildError, match="unknown initramfs compression 'xz'"):
        compress(raw, "xz")  # type: ignore[arg-type]
    with pytest.raises(BuildError, match="zstd level 22 is out of range; use 1-19"):
        compress(raw, "zstd", 22)
    assert gzip.decompress((compress(raw, "gzip", 1)).read_bytes()) == raw.read_bytes()


def test_missing_tool_is_a_clear_error(tree: list[Entry], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BuildError, match="'lz4' is not installed; install the Debian package lz4"):
        write_initramfs(tree, tmp_path / "x.lz4", "lz4")
    assert not list(tmp_path.glob(".x.lz4*")), "the partial output was left behind"


def test_a_failing_tool_is_a_build_error(tree: list[Entry], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin" / "zstd"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'zstd: out of disk space' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    big = tmp_path / "big"
    big.write_bytes(b"x" * (4 << 20))  # more than a pipe buffer: the writer meets a dead reader
    with pytest.raises(BuildError, match="zstd failed \\(exit 1\\): zstd: out of disk space"):
        write_initramfs([*tree, File("big", big)], tmp_path / "out.zst", "zstd")
    assert not (tmp_path / "out.zst").exists()
