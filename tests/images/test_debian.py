"""The conventional Debian image's parts: mirror, cache keys, statistics, and (slow) real debootstrap."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from uniframe.build import debian


def test_mirror_comes_from_the_hosts_apt_sources(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb deb-src\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    one_line = tmp_path / "sources.list"
    one_line.write_text("# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://old.example/debian bookworm main\n")
    assert debian.host_mirror("bookworm", [deb822]) == "http://mirror.example/debian"
    assert debian.host_mirror("bookworm", [one_line, deb822]) == "http://old.example/debian"
    assert debian.host_mirror("trixie", [one_line, deb822]) == debian.DEFAULT_MIRROR


def test_cache_key_depends_on_inputs_not_their_order() -> None:
    a = debian.rootfs_key("bookworm", "minbase", ["python3", "python3-pip"])
    assert a == debian.rootfs_key("bookworm", "minbase", ["python3-pip", "python3", "python3"])
    assert a != debian.rootfs_key("bookworm", "minbase", ["python3"])
    assert a != debian.rootfs_key("trixie", "minbase", ["python3", "python3-pip"])
    assert a.startswith("bookworm-minbase-")


def test_rootfs_stats_counts_what_could_run(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    elf = tmp_path / "bin" / "prog"
    shutil.copyfile("/bin/true", elf)
    (tmp_path / "bin" / "script").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "data").write_text("not a program")
    (tmp_path / "bin" / "lib.so").write_bytes(b"\x7fELF....")  # ELF but not executable
    for name in ("prog", "script", "data"):
        (tmp_path / "bin" / name).chmod(0o755)
    (tmp_path / "bin" / "su").write_bytes(b"\x7fELF")
    (tmp_path / "bin" / "su").chmod(0o4755)
    os.link(elf, tmp_path / "bin" / "prog2")
    (tmp_path / "link").symlink_to("bin/prog")
    stats = debian.rootfs_stats(tmp_path)
    assert stats.files == 6
    assert stats.executables == 4  # prog, prog2, script, su
    assert stats.setuid == 1
    assert stats.size_bytes == sum(p.stat().st_size for p in (tmp_path / "bin").iterdir()) - elf.stat().st_size


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap and chroot need root")


@pytest.mark.root
@pytest.mark.slow
@needs_root
def test_debootstrap_rootfs_is_cached_and_runs_python_3_11() -> None:
    rootfs = debian.debootstrap_rootfs(include=debian.PYTHON_PACKAGES)
    info = debian.rootfs_info(rootfs)
    assert info["include"] == sorted(debian.PYTHON_PACKAGES)
    print(f"debootstrap took {info['debootstrap_seconds']} s")
    started = time.monotonic()
    assert debian.debootstrap_rootfs(include=list(reversed(debian.PYTHON_PACKAGES))) == rootfs
    assert time.monotonic() - started < 1.0
    version = subprocess.run(["chroot", str(rootfs), "python3", "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("Python 3.11."), version
    assert not list((rootfs / "var/cache/apt/archives").glob("*.deb"))
    assert not [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if str(rootfs) in ln]


@pytest.mark.root
@pytest.mark.slow
@needs_root
def test_conventional_rootfs_has_the_servers_wheels_and_code() -> None:
    rootfs = debian.conventional_python_rootfs()
    script = ("import numpy, onnxruntime, orjson, uniframe.serve.http; "
              "print(numpy.__version__, onnxruntime.__version__, orjson.__version__)")
    proc = subprocess.run(["chroot", str(rootfs), f"{debian.VENV}/bin/python3", "-c", script],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    pins = dict(p.split("==") for p in debian.pinned_requirements())
    assert proc.stdout.split() == [pins["numpy"], pins["onnxruntime"], pins["orjson"]]
    # only the server of uniframe ships, not the platform around it
    site = next((rootfs / "opt/venv/lib").glob("python3*/site-packages/uniframe"))
    assert sorted(p.name for p in site.iterdir() if p.name != "__pycache__") == ["__init__.py", "serve"]
    assert not (rootfs / "tmp" / "wheels").exists()
