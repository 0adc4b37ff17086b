"""ELF reading and library search, checked against binutils and ld.so on real system files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from uniframe.build.closure.elf import LibrarySearch, ld_so_conf_dirs, read_elf

PYTHON = os.path.realpath(sys.executable)
LIBC = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")


def _readelf_dynamic(path: str) -> dict[str, list[str]]:
    out = subprocess.run(["readelf", "-dW", path], capture_output=True, text=True, check=True).stdout
    found: dict[str, list[str]] = {"NEEDED": [], "RUNPATH": [], "RPATH": [], "SONAME": []}
    for tag, value in re.findall(r"\((NEEDED|RUNPATH|RPATH|SONAME)\)\s+[^\[]*\[(.*)\]", out):
        found[tag] += value.split(":") if tag in ("RUNPATH", "RPATH") else [value]
    return found


def _elf_samples() -> list[str]:
    import numpy

    core = Path(numpy.__file__).parent / "_core"
    samples = [PYTHON, LIBC, "/usr/bin/python3.11", *map(str, core.glob("_multiarray_umath*.so"))]
    return [p for p in samples if os.path.exists(p)]


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils' readelf")
@pytest.mark.parametrize("path", _elf_samples())
def test_dynamic_section_matches_readelf(path: str) -> None:
    info = read_elf(path)
    assert info is not None
    expected = _readelf_dynamic(path)
    assert list(info.needed) == expected["NEEDED"]
    assert list(info.runpath) == expected["RUNPATH"]
    assert list(info.rpath) == expected["RPATH"]
    assert ([info.soname] if info.soname else []) == expected["SONAME"]


def test_interpreter_and_executable_rule() -> None:
    python = read_elf(PYTHON)
    assert python is not None
    assert python.interpreter == "/lib64/ld-linux-x86-64.so.2"
    assert python.is_executable
    libc = read_elf(LIBC)
    assert libc is not None
    # glibc's libc.so.6 has a PT_INTERP too, yet it is a library.
    assert libc.interpreter is not None
    assert not libc.is_executable
    assert read_elf(__file__) is None


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
@pytest.mark.parametrize("program", [PYTHON, "/usr/bin/python3.11"])
def test_transitive_resolution_matches_ldd(program: str) -> None:
    if not os.path.exists(program):
        pytest.skip(f"{program} is not installed")
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    expected = {
        os.path.realpath(m) for m in re.findall(r"=> (/\S+)", out)
    } | {os.path.realpath(m) for m in re.findall(r"^\s+(/\S+) \(", out, re.M)}
    search = LibrarySearch()
    seen: set[str] = set()
    todo = [program]
    while todo:
        path = todo.pop()
        info = search.info(path)
        assert info is not None
        if info.interpreter:
            seen.add(os.path.realpath(info.interpreter))
        for name in info.needed:
            found = search.find(name, requester=path, program=program)
            assert found is not None, f"{name} needed by {path} not found"
            real = os.path.realpath(found.path)
            if real not in seen:
                seen.add(real)
                todo.append(real)
    assert seen == expected


def test_runpath_and_origin_rpath() -> None:
    search = LibrarySearch()
    libpython = os.path.basename(sysconfig.get_config_var("INSTSONAME") or "libpython3.11.so.1.0")
    found = search.find(libpython, requester=PYTHON, program=PYTHON)
    assert found is not None and found.via == "runpath"
    assert found.path.startswith(sys.base_prefix)

    import numpy

    ext = next((Path(numpy.__file__).parent / "_core").glob("_multiarray_umath*.so"))
    info = search.info(str(ext))
    assert info is not None
    blas = next(n for n in info.needed if "openblas" in n)
    found = search.find(blas, requester=str(ext), program=PYTHON)
    assert found is not None and found.via == "rpath"
    assert Path(found.path).parent.resolve() == Path(numpy.__file__).parent.parent / "numpy.libs"


def test_system_library_found_without_the_cache() -> None:
    search = LibrarySearch(cache_dirs=[])
    found = search.find("libz.so.1", requester=PYTHON, program=PYTHON)
    assert found is not None
    assert found.via == "default"
    assert os.path.islink(found.path)  # the soname link, not the real file


def test_wrong_class_candidate_is_skipped(tmp_path: Path) -> None:
    wrong, right = tmp_path / "wrong", tmp_path / "right"
    wrong.mkdir()
    right.mkdir()
    # An ELF32 header with no program headers: a 32-bit library as far as ld.so cares.
    header = b"\x7fELF\x01\x01\x01" + bytes(9) + (3).to_bytes(2, "little") + (3).to_bytes(2, "little")
    (wrong / "libfake.so.1").write_bytes(header + bytes(52 - len(header)))
    shutil.copyfile(LIBC, right / "libfake.so.1")
    search = LibrarySearch(cache_dirs=[], default_dirs=[str(wrong), str(right)])
    found = search.find("libfake.so.1", requester=PYTHON, program=PYTHON)
    assert found is not None and found.path == str(right / "libfake.so.1")


def test_ld_so_conf_includes(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "b.conf").write_text("/opt/b\n# comment\n/opt/a\n")
    (tmp_path / "conf.d" / "a.conf").write_text("/opt/first\n")
    conf = tmp_path / "ld.so.conf"
    conf.write_text("include conf.d/*.conf\n/usr/local/lib\nhwcap 0 nosegneg\n")
    assert ld_so_conf_dirs(str(conf)) == ["/opt/first", "/opt/b", "/opt/a", "/usr/local/lib"]
