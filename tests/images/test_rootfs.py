"""The squashfs root writer against the real mksquashfs/unsquashfs, and the root format options."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from uniframe.build import rootfs
from uniframe.build.initramfs import Device, Directory, Entry, File, Symlink
from uniframe.build.unikernel import DEFAULT_BLOCK_SIZE, DEFAULT_SQUASHFS_COMPRESSION, RootOptions
from uniframe.errors import BuildError, SpecError
from uniframe.spec import load_file

pytestmark = pytest.mark.skipif(shutil.which("mksquashfs") is None,
                                reason="squashfs-tools is not installed (scripts/install.sh)")

LONG = "/usr/lib/python3.11/site-packages/" + "a" * 90 + "/" + "b" * 120 + ".py"


def entries(tmp_path: Path) -> list[Entry]:
    src = tmp_path / "lib.so"
    src.write_bytes(os.urandom(300_000))  # several blocks, incompressible
    src.chmod(0o755)
    return [
        File("/init", b"#!/usr/bin/python3 -IBS\n", 0o755),
        File("/usr/lib/libx.so.1.2", src),
        Symlink("/usr/lib/libx.so.1", "libx.so.1.2"),
        Device("/dev/console", "c", 5, 1, 0o600),
        Directory("/tmp", 0o1777),
        File(LONG, b"print('deep')\n"),
    ]


def listing(image: Path) -> dict[str, str]:
    out = subprocess.run(["unsquashfs", "-lls", "-d", "", str(image)], capture_output=True,
                         text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        # "crw------- root/root   5,  1 1970-01-01 00:00 /dev/console"; the root's name is ""
        if m := re.match(r"[-dlcb]\S+ .* \d{4}-\d\d-\d\d \d\d:\d\d ?(.*)$", line):
            rows[m[1].split(" -> ")[0]] = line
    return rows


def cat(image: Path, path: str) -> bytes:
    return subprocess.run(["unsquashfs", "-cat", str(image), path], capture_output=True,
                          check=True).stdout


def test_the_image_holds_the_entries_owned_by_root_at_one_time(tmp_path: Path) -> None:
    image = rootfs.write_squashfs(entries(tmp_path), tmp_path / "root.squashfs", "zstd",
                                  block_size=128 << 10)
    rows = listing(image)
    assert all("root/root" in row and "1970-01-01 00:00" in row for row in rows.values()), rows
    assert rows[""].startswith("drwxr-xr-x")  # the root directory itself
    assert rows["/init"].startswith("-rwxr-xr-x")
    assert rows["/usr/lib/libx.so.1.2"].startswith("-rwxr-xr-x")
    assert rows["/usr/lib/libx.so.1"].startswith("lrwxrwxrwx") and "-> libx.so.1.2" in rows["/usr/lib/libx.so.1"]
    assert rows["/dev/console"].startswith("crw-------") and "5,  1" in rows["/dev/console"]
    assert rows["/tmp"].startswith("drwxrwxrwt")
    assert "/usr/lib/python3.11/site-packages" in rows  # parents added, long names kept
    assert cat(image, LONG) == b"print('deep')\n"
    assert cat(image, "/usr/lib/libx.so.1.2") == (tmp_path / "lib.so").read_bytes()
    assert image.stat().st_size % 4096 == 0  # padded for the block device


def test_same_entries_same_bytes_whatever_the_host_times(tmp_path: Path) -> None:
    ents = entries(tmp_path)
    first = rootfs.write_squashfs(ents, tmp_path / "a.squashfs", "zstd", block_size=1 << 20)
    os.utime(tmp_path / "lib.so", (1_700_000_000, 1_700_000_000))
    second = rootfs.write_squashfs(list(reversed(ents)), tmp_path / "b.squashfs", "zstd",
                                   block_size=1 << 20)
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    later = rootfs.write_squashfs(ents, tmp_path / "c.squashfs", "zstd", block_size=1 << 20, mtime=86400)
    assert later.read_bytes() != first.read_bytes()
    assert "1970-01-02" in listing(later)["/init"]


@pytest.mark.parametrize(("method", "level", "says"), [
    ("none", None, "Data is uncompressed"),
    ("gzip", 9, "Compression gzip"),
    ("lz4", 1, "Compression lz4"),
    ("lz4", 9, "High Compression option specified (-Xhc)"),
    ("zstd", 19, "compression-level 19"),
    ("xz", None, "Compression xz"),
])
def test_every_compression_the_kernel_reads(tmp_path: Path, method: rootfs.Method, level: int | None,
                                            says: str) -> None:
    image = rootfs.write_squashfs(entries(tmp_path), tmp_path / "root.squashfs", method, level,
                                  block_size=256 << 10)
    info = subprocess.run(["unsquashfs", "-s", str(image)], capture_output=True, text=True,
                          check=True).stdout
    assert says in info and "Block size 262144" in info
    assert cat(image, "/init") == b"#!/usr/bin/python3 -IBS\n"


def test_lz4_hc_only_from_level_3() -> None:
    assert rootfs.compressor_args("lz4", 1) == ["-comp", "lz4"]
    assert rootfs.compressor_args("lz4", 3) == ["-comp", "lz4", "-Xhc"]


@pytest.mark.parametrize(("method", "level", "block", "message"), [
    ("lzo", None, 1 << 17, "unknown squashfs compression 'lzo'"),
    ("zstd", 23, 1 << 17, "squashfs zstd level 23 is out of range; use 1-22"),
    ("xz", 6, 1 << 17, "squashfs xz level 6 is out of range; use 0-0"),
    ("zstd", None, 3 << 17, "block size 393216 is not one of 4K, 8K"),
    ("zstd", None, 2 << 20, "is not one of"),
])
def test_bad_options_are_refused_before_anything_is_written(
        tmp_path: Path, method: str, level: int | None, block: int, message: str) -> None:
    with pytest.raises(BuildError, match=message.replace("(", r"\(")):
        rootfs.write_squashfs(entries(tmp_path), tmp_path / "root.squashfs",
                              method, level, block_size=block)  # type: ignore[arg-type]
    assert not list(tmp_path.glob("*root.squashfs*"))


def test_an_unreadable_source_is_a_build_error_and_leaves_nothing(tmp_path: Path) -> None:
    missing = File("/usr/lib/gone.so", tmp_path / "gone.so")
    with pytest.raises(BuildError, match=r"cannot read .*gone.so \(for usr/lib/gone.so in the root"):
        rootfs.write_squashfs([*entries(tmp_path), missing], tmp_path / "out" / "root.squashfs")
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_mksquashfs_says_which_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(BuildError, match="install the Debian package squashfs-tools"):
        rootfs.write_squashfs(entries(tmp_path), tmp_path / "root.squashfs")


def test_root_options_fill_in_the_measured_defaults() -> None:
    squash = RootOptions().resolved()
    assert (squash.format, squash.compression, squash.block_size) == (
        "squashfs", DEFAULT_SQUASHFS_COMPRESSION, DEFAULT_BLOCK_SIZE)
    assert squash.level == rootfs.DEFAULT_LEVELS[DEFAULT_SQUASHFS_COMPRESSION]
    initrd = RootOptions("initramfs").resolved()
    assert (initrd.format, initrd.compression, initrd.block_size) == ("initramfs", "lz4", None)
    assert RootOptions("initramfs", "zstd").resolved().level == 19


@pytest.mark.parametrize(("options", "message"), [
    (RootOptions("initramfs", "xz"), "an initramfs cannot be compressed with xz"),
    (RootOptions("initramfs", "lz4", block_size=1 << 20), "block size applies to the squashfs"),
    (RootOptions("ext4"), "unknown root format 'ext4'"),  # type: ignore[arg-type]
])
def test_root_options_that_do_not_fit_the_format(options: RootOptions, message: str) -> None:
    with pytest.raises(BuildError, match=message):
        options.resolved()


def test_a_bad_rootfs_in_the_spec_names_the_field(tmp_path: Path) -> None:
    spec = tmp_path / "svc.yaml"
    spec.write_text("apiVersion: uniframe.dev/v1alpha1\nkind: InferenceService\n"
                    "metadata: {name: iris}\nspec:\n  model: {uri: ./iris.onnx}\n"
                    "  image: {rootfs: ext4, compression: zstd}\n")
    (tmp_path / "iris.onnx").write_bytes(b"")
    with pytest.raises(SpecError) as err:
        load_file(spec)
    assert "spec.image.rootfs: 'ext4' is not one of 'squashfs' or 'initramfs'" in str(err.value)
    spec.write_text(spec.read_text().replace("ext4", "initramfs"))
    (doc,) = load_file(spec)
    assert doc.spec.spec.image.rootfs == "initramfs"  # type: ignore[union-attr]


def test_a_failing_mksquashfs_is_a_build_error_with_its_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rootfs, "mksquashfs_argv", lambda *a, **k: [
        "sh", "-c", "head -c 100 >/dev/null; echo 'no space left' >&2; exit 3"])
    entries: list[Entry] = [File("/big", b"x" * (1 << 20), 0o644)]
    dest = tmp_path / "root.squashfs"
    with pytest.raises(BuildError, match=r"mksquashfs failed \(exit 3\): no space left"):
        rootfs.write_squashfs(entries, dest)
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # no partial file left
