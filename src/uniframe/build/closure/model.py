"""The closure as a value: which files an image holds, what each one is, whose it is.

A ``Closure`` is what the image builders consume and what ``uniframe`` shows
a user who asks why an image is the size it is, so it is plain data that
survives a JSON round trip unchanged. Image paths equal host paths: the image
keeps the interpreter at the prefix it was built for, so ``sys.prefix``,
RUNPATHs and ``$ORIGIN`` links work without relocation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

Kind = Literal[
    "python-module", "extension", "shared-lib", "executable", "loader", "data", "symlink", "dir"
]
KINDS: frozenset[str] = frozenset(get_args(Kind))
ELF_KINDS: frozenset[str] = frozenset({"extension", "shared-lib", "executable", "loader"})


@dataclass(frozen=True)
class Entry:
    """One path of the image. ``size`` is the file's bytes (a symlink's: its target's length)."""

    path: str
    image_path: str
    kind: Kind
    size: int
    mode: int
    package: str
    target: str | None = None  # a symlink's target, exactly as ``readlink`` gives it


@dataclass(frozen=True)
class PackageRow:
    package: str
    files: int
    bytes: int


@dataclass(frozen=True)
class Closure:
    """The files an app needs, sorted by image path, plus what the trace learnt on the way."""

    entries: tuple[Entry, ...]
    interpreter: str
    cache_tag: str
    argv: tuple[str, ...] = ()
    trace_seconds: float = 0.0
    writes: tuple[str, ...] = ()  # files the app wrote: not in the image, the guest must allow them
    pseudo_paths: tuple[str, ...] = ()  # /proc, /sys and /dev paths the app read
    notes: tuple[str, ...] = field(default=())

    def files(self) -> list[Entry]:
        """Everything but directories."""
        return [e for e in self.entries if e.kind != "dir"]

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries if e.kind not in ("dir", "symlink"))

    def executables(self) -> list[Entry]:
        """ELF programs (with a PT_INTERP, not libraries): the attack surface a shell would need."""
        return [e for e in self.entries if e.kind == "executable"]

    def by_package(self) -> list[PackageRow]:
        """Files and bytes per package, biggest first (directories are not counted)."""
        files: dict[str, int] = {}
        size: dict[str, int] = {}
        for e in self.files():
            files[e.package] = files.get(e.package, 0) + 1
            if e.kind != "symlink":
                size[e.package] = size.get(e.package, 0) + e.size
        rows = [PackageRow(p, n, size.get(p, 0)) for p, n in files.items()]
        return sorted(rows, key=lambda r: (-r.bytes, r.package))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Closure:
        data = json.loads(text)
        entries = tuple(_entry(e) for e in data.pop("entries"))
        for key in ("argv", "writes", "pseudo_paths", "notes"):
            data[key] = tuple(data.get(key, ()))
        return cls(entries=entries, **data)


def _entry(raw: dict[str, Any]) -> Entry:
    if raw.get("kind") not in KINDS:
        raise ValueError(f"unknown closure entry kind {raw.get('kind')!r}")
    return Entry(**raw)


def sorted_entries(entries: Iterable[Entry]) -> tuple[Entry, ...]:
    return tuple(sorted(entries, key=lambda e: e.image_path))
