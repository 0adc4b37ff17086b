"""Materializing closures: pycs the interpreter really uses, stripping rules, determinism."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from uniframe.build.closure.materialize import materialize, never_strip, tree_digest
from uniframe.build.closure.model import Closure, Entry, Kind
from uniframe.errors import BuildError

# Not stripped (pyenv builds keep debug info): strip has something to remove.
UNSTRIPPED = os.path.realpath(sys.executable)

MODULE = '''
"""A module whose constants include a frozenset: its marshal order follows string hashes."""
WORDS = frozenset({"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"})

def answer(word):
    return word in {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"}
'''


def _entry(path: Path | str, kind: Kind, package: str = "test",
           target: str | None = None) -> Entry:
    p = str(path)
    st = os.lstat(p)
    size = st.st_size if kind not in ("dir", "symlink") else 0
    return Entry(path=p, image_path=p, kind=kind, size=size, mode=stat.S_IMODE(st.st_mode),
                 package=package, target=target)


@pytest.fixture
def closure(tmp_path: Path) -> Closure:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("")
    (src / "pkg" / "words.py").write_text(MODULE)
    (src / "pkg" / "tool.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "pkg" / "tool.sh", 0o750)
    (src / "pkg" / "link.sh").symlink_to("tool.sh")
    libs = src / "pkg.libs"
    libs.mkdir()
    for dest in (libs / "libpatched.so", src / "pkg" / "ext.so", src / "ld.so"):
        shutil.copyfile(UNSTRIPPED, dest)
        os.chmod(dest, 0o755)
    entries = [
        _entry(src, "dir"),
        _entry(src / "pkg", "dir"),
        _entry(src / "pkg" / "__init__.py", "python-module"),
        _entry(src / "pkg" / "words.py", "python-module"),
        _entry(src / "pkg" / "tool.sh", "data"),
        _entry(src / "pkg" / "link.sh", "symlink", target="tool.sh"),
        _entry(src / "pkg" / "ext.so", "extension"),
        _entry(libs, "dir"),
        _entry(libs / "libpatched.so", "shared-lib"),
        _entry(src / "ld.so", "loader", package="system"),
    ]
    return Closure(entries=tuple(sorted(entries, key=lambda e: e.image_path)),
                   interpreter=sys.executable, cache_tag=sys.implementation.cache_tag)


def _inside(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def test_tree_layout_modes_and_links(closure: Closure, tmp_path: Path) -> None:
    root = tmp_path / "root"
    stats = materialize(closure, root)
    src = closure.entries[0].path
    tool = _inside(root, f"{src}/pkg/tool.sh")
    assert stat.S_IMODE(tool.stat().st_mode) == 0o750
    link = _inside(root, f"{src}/pkg/link.sh")
    assert link.is_symlink() and os.readlink(link) == "tool.sh"
    assert link.read_text() == "#!/bin/sh\n"
    assert _inside(root, f"{src}/pkg/__pycache__/words.{sys.implementation.cache_tag}.pyc").exists()
    assert stats.pyc_files == 2
    assert stats.symlinks == 1
    # Every mtime is 0: nothing in the tree depends on when it was built.
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            assert os.lstat(os.path.join(dirpath, name)).st_mtime == 0


def test_strip_skips_loader_and_auditwheel_libs(closure: Closure, tmp_path: Path) -> None:
    if shutil.which("strip") is None:
        pytest.skip("needs binutils' strip")
    root = tmp_path / "root"
    stats = materialize(closure, root)
    by_name = {Path(e.path).name: e for e in closure.entries}
    original = Path(UNSTRIPPED).read_bytes()
    for name in ("libpatched.so", "ld.so"):
        assert never_strip(by_name[name])
        assert _inside(root, by_name[name].image_path).read_bytes() == original
    ext = _inside(root, by_name["ext.so"].image_path)
    assert ext.stat().st_size < len(original)
    assert stats.stripped_files == 1
    assert stats.elf_bytes_before == 3 * len(original)
    assert stats.elf_bytes_after == 2 * len(original) + ext.stat().st_size
    assert stats.bytes_before_strip - stats.total_bytes == len(original) - ext.stat().st_size
    # The stripped program still runs.
    shutil.copymode(UNSTRIPPED, ext)
    out = subprocess.run([str(ext), "-c", "print(6 * 7)"], capture_output=True, text=True,
                         check=True)
    assert out.stdout == "42\n"


def test_same_closure_gives_identical_trees(closure: Closure, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    old = os.umask(0o022)
    try:
        materialize(closure, one)
        os.umask(0o077)  # a different umask must not change a single mode
        materialize(closure, two)
    finally:
        os.umask(old)
    assert tree_digest(one) == tree_digest(two)
    (one / "extra").write_text("x")
    assert tree_digest(one) != tree_digest(two)


def _run_in(root: Path, src: str, code: str) -> str:
    """Import from the materialized tree, with bytecode writing off as on a read-only root."""
    env = {"PYTHONPATH": str(_inside(root, src)), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_pycs_are_unchecked_hash_and_used(closure: Closure, tmp_path: Path) -> None:
    root = tmp_path / "root"
    materialize(closure, root)
    src = closure.entries[0].path
    pyc = _inside(root, f"{src}/pkg/__pycache__/words.{sys.implementation.cache_tag}.pyc")
    flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
    assert flags == 0b01  # hash-based, source not checked
    # Change the source in the tree: an unchecked pyc is still what runs.
    source = _inside(root, f"{src}/pkg/words.py")
    source.write_text("def answer(word):\n    return 'edited'\n")
    assert _run_in(root, src, "import pkg.words as w; print(w.answer('beta'))") == "True"


def test_sourceless_tree(closure: Closure, tmp_path: Path) -> None:
    root = tmp_path / "root"
    stats = materialize(closure, root, sources=False)
    src = closure.entries[0].path
    assert not _inside(root, f"{src}/pkg/words.py").exists()
    assert _inside(root, f"{src}/pkg/words.pyc").exists()
    assert stats.source_bytes == 0
    assert not list(root.rglob("*.src"))
    assert _run_in(root, src, "import pkg.words as w; print(w.answer('zeta'), w.__file__)") \
        == f"True {_inside(root, src)}/pkg/words.pyc"


def test_refuses_a_non_empty_root(closure: Closure, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "old").write_text("x")
    with pytest.raises(BuildError, match="not empty"):
        materialize(closure, root)
