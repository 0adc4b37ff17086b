"""Say which package each closure file belongs to.

The per-package table is how a user sees where an image's bytes go (numpy's
bundled OpenBLAS, onnxruntime, the interpreter, libc...), so the grouping
follows what they installed rather than directory names: a site-packages
entry belongs to the distribution whose ``RECORD`` lists it (``numpy.libs``
is numpy's), with the top-level name as the fallback for files no RECORD
claims (editable checkouts, hand-made ``.pth`` files).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

STDLIB = "python-stdlib"
PYTHON = "python"
SYSTEM = "system"
DATA = "data"
_SYSTEM_ROOTS = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc", "/opt")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _dist_name(dist_info: str) -> str:
    """``numpy-2.4.6.dist-info`` -> ``numpy``."""
    return dist_info.rsplit(".", 1)[0].split("-", 1)[0]


def _top_name(first: str) -> str:
    """A site-packages top-level entry's own name: ``numpy.libs`` -> ``numpy``, ``six.py`` -> ``six``."""
    for suffix in (".dist-info", ".egg-info", ".data"):
        if first.endswith(suffix):
            return _dist_name(first)
    name = first.removesuffix(".libs").removesuffix(".pth")
    if name.endswith((".py", ".pyc")):
        return name.rsplit(".", 1)[0]
    if name.endswith(".so"):
        return name.split(".", 1)[0]
    return name


def record_owners(site_dir: str) -> dict[str, str]:
    """Map each top-level entry of ``site_dir`` to the distribution whose RECORD lists it."""
    owners: dict[str, str] = {}
    try:
        names = sorted(os.listdir(site_dir))
    except OSError:
        return owners
    for name in names:
        if not name.endswith(".dist-info"):
            continue
        dist = _dist_name(name)
        owners.setdefault(name, dist)
        record = Path(site_dir, name, "RECORD")
        try:
            with record.open(newline="", encoding="utf-8") as f:
                for row in csv.reader(f):
                    if not row or row[0].startswith(("..", "/")):
                        continue
                    first = row[0].split("/", 1)[0]
                    if first != "__pycache__":
                        owners.setdefault(first, dist)
        except OSError:
            continue
    return owners


class PackageIndex:
    """Classify paths given where the traced interpreter keeps its stdlib and site dirs."""

    def __init__(
        self,
        *,
        prefixes: Iterable[str],
        stdlib_dir: str,
        site_dirs: Iterable[str],
        path_entries: Iterable[str] = (),
    ) -> None:
        self.prefixes = sorted({p for p in prefixes if p and p != "/"}, key=len, reverse=True)
        self.stdlib_dir = stdlib_dir
        self.site_dirs = sorted({d for d in site_dirs if d}, key=len, reverse=True)
        # Other sys.path entries (an editable checkout's src/) group like site dirs,
        # but those inside the stdlib (lib-dynload, python311.zip) are the stdlib's.
        extra = {
            p for p in path_entries
            if p.startswith("/") and p != "/" and not _within(p, stdlib_dir)
            and p not in self.site_dirs
        }
        self.path_dirs = sorted(extra, key=len, reverse=True)
        self._owners: dict[str, dict[str, str]] = {}

    def _owner(self, site_dir: str, first: str) -> str:
        if site_dir not in self._owners:
            self._owners[site_dir] = record_owners(site_dir)
        return self._owners[site_dir].get(first) or _top_name(first)

    def package_of(self, path: str) -> str:
        for site in self.site_dirs:
            if _within(path, site) and path != site:
                return self._owner(site, _first(path, site))
        if _within(path, self.stdlib_dir):
            return STDLIB
        if any(_within(path, p) for p in self.prefixes):
            return PYTHON
        for entry in self.path_dirs:
            if _within(path, entry) and path != entry:
                first = _first(path, entry)
                if _is_python(os.path.join(entry, first)):
                    return self._owner(entry, first)
        if any(_within(path, r) for r in _SYSTEM_ROOTS) or path == "/":
            return SYSTEM
        return DATA


def _first(path: str, root: str) -> str:
    return path[len(root.rstrip("/")) + 1:].split("/", 1)[0]


def _is_python(top: str) -> bool:
    """Whether a sys.path entry's child is Python code (a package or module), not app data."""
    if os.path.isdir(top):
        return os.path.exists(os.path.join(top, "__init__.py"))
    return top.endswith((".py", ".pyc", ".so", ".pth"))
