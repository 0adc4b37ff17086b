"""Package grouping: real site-packages on this host, plus a hand-made site dir."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import numpy
import onnxruntime
import pytest

from uniframe.build.closure.model import Closure, Entry, PackageRow
from uniframe.build.closure.packages import PackageIndex, record_owners

SITE = sysconfig.get_paths()["purelib"]
STDLIB = os.path.dirname(os.__file__)


@pytest.fixture
def index() -> PackageIndex:
    import uniframe

    checkout = str(Path(uniframe.__file__).parent.parent)
    return PackageIndex(
        prefixes=[sys.prefix, sys.base_prefix],
        stdlib_dir=STDLIB,
        site_dirs=[SITE],
        path_entries=[*sys.path, checkout],
    )


def test_real_files_group_by_distribution(index: PackageIndex) -> None:
    numpy_libs = next(Path(numpy.__file__).parent.parent.glob("numpy.libs/*"))
    assert index.package_of(str(numpy_libs)) == "numpy"
    assert index.package_of(numpy.__file__) == "numpy"
    assert index.package_of(onnxruntime.__file__) == "onnxruntime"
    dist_info = next(Path(SITE).glob("numpy-*.dist-info"))
    assert index.package_of(str(dist_info / "METADATA")) == "numpy"
    assert index.package_of(f"{STDLIB}/json/__init__.py") == "python-stdlib"
    dynload = next(Path(STDLIB, "lib-dynload").glob("_json*.so"))
    assert index.package_of(str(dynload)) == "python-stdlib"
    assert index.package_of(os.path.realpath(sys.executable)) == "python"
    libdir = sysconfig.get_config_var("LIBDIR")
    libpython = sysconfig.get_config_var("INSTSONAME")
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        assert index.package_of(os.path.join(libdir, libpython)) == "python"
    assert index.package_of("/usr/lib/x86_64-linux-gnu/libc.so.6") == "system"
    assert index.package_of("/etc/ld.so.cache") == "system"
    assert index.package_of("/srv/models/iris.onnx") == "data"


def test_editable_checkout_groups_by_top_level_package(index: PackageIndex) -> None:
    import uniframe.serve.http as http

    assert index.package_of(http.__file__) == "uniframe"


def test_record_owners(tmp_path: Path) -> None:
    info = tmp_path / "Foo_Bar-1.0.dist-info"
    info.mkdir()
    (info / "RECORD").write_text(
        "foo/__init__.py,sha256=x,1\n"
        "foo.libs/libbar-1234.so.1,sha256=y,2\n"
        "_foo_hack/__init__.py,,\n"
        "__pycache__/foo_mod.cpython-311.pyc,,\n"
        "../../../bin/foo,,\n"
        "Foo_Bar-1.0.dist-info/RECORD,,\n"
    )
    owners = record_owners(str(tmp_path))
    assert owners == {
        "Foo_Bar-1.0.dist-info": "Foo_Bar",
        "foo": "Foo_Bar",
        "foo.libs": "Foo_Bar",
        "_foo_hack": "Foo_Bar",
    }
    index = PackageIndex(prefixes=[], stdlib_dir="/nowhere", site_dirs=[str(tmp_path)])
    assert index.package_of(str(tmp_path / "foo.libs" / "libbar-1234.so.1")) == "Foo_Bar"
    # Not in any RECORD: fall back to the top-level name, without .libs or suffix.
    assert index.package_of(str(tmp_path / "other.libs" / "x.so")) == "other"
    assert index.package_of(str(tmp_path / "six.py")) == "six"


def _entry(path: str, kind: str, size: int, package: str, target: str | None = None) -> Entry:
    return Entry(path=path, image_path=path, kind=kind, size=size, mode=0o644,  # type: ignore[arg-type]
                 package=package, target=target)


def test_by_package_counts_files_and_bytes() -> None:
    closure = Closure(
        entries=(
            _entry("/usr", "dir", 0, "system"),
            _entry("/usr/lib/libc.so.6", "shared-lib", 2000, "system"),
            _entry("/usr/lib/libz.so.1", "symlink", 14, "system", "libz.so.1.2"),
            _entry("/usr/lib/libz.so.1.2", "shared-lib", 100, "system"),
            _entry("/site/numpy/__init__.py", "python-module", 300, "numpy"),
            _entry("/site/numpy.libs/libopenblas.so", "shared-lib", 5000, "numpy"),
            _entry("/py/bin/python3", "executable", 50, "python"),
        ),
        interpreter="/py/bin/python3",
        cache_tag="cpython-311",
    )
    assert closure.by_package() == [
        PackageRow("numpy", 2, 5300),
        PackageRow("system", 3, 2100),
        PackageRow("python", 1, 50),
    ]
    assert closure.total_bytes == 7450
    assert [e.path for e in closure.executables()] == ["/py/bin/python3"]
    assert Closure.from_json(closure.to_json()) == closure


def test_unknown_kind_is_rejected() -> None:
    closure = Closure(entries=(_entry("/x", "data", 1, "data"),), interpreter="/p", cache_tag="t")
    text = closure.to_json().replace('"data"', '"weird"', 1)
    with pytest.raises(ValueError, match="weird"):
        Closure.from_json(text)
