"""Quantities written the way Kubernetes users already write them.

Memory and body sizes accept binary (``Ki``, ``Mi``, ``Gi``, ``Ti``) and
decimal (``k``/``K``, ``M``, ``G``, ``T``) suffixes, or a plain number of
bytes. ``256Mb`` is refused rather than guessed: ``b`` reads as bits to some
people and bytes to others, and a spec must mean one thing.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<suffix>[A-Za-z]*)")
_MULTIPLIERS = {
    "": 1,
    "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4,
}
_PERCENT = re.compile(r"(?P<number>[0-9]+)%")


def parse_size(value: object) -> int:
    """Return ``value`` in bytes; raise ``ValueError`` with a message for people."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a size, use e.g. 256Mi")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value.strip())
        if match is None or match["suffix"] not in _MULTIPLIERS:
            raise ValueError(f"{value!r} is not a size, use e.g. 256Mi")
        exact = float(match["number"]) * _MULTIPLIERS[match["suffix"]]
        if exact != int(exact):
            raise ValueError(f"{value!r} is not a whole number of bytes, use e.g. 256Mi")
        size = int(exact)
    if size <= 0:
        raise ValueError(f"{value!r} must be more than 0 bytes, use e.g. 256Mi")
    return size


def format_size(size: int) -> str:
    """The shortest exact binary spelling of ``size``, e.g. ``268435456`` -> ``256Mi``."""
    for suffix in ("Ti", "Gi", "Mi", "Ki"):
        unit = _MULTIPLIERS[suffix]
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def parse_count_or_percent(value: object) -> int | str:
    """A replica count (``1``) or a share of the replicas (``"25%"``), as Kubernetes rollouts take."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value} must be 0 or more")
        return value
    if isinstance(value, str):
        match = _PERCENT.fullmatch(value.strip())
        if match is not None and int(match["number"]) <= 100:
            return f"{int(match['number'])}%"
    raise ValueError(f"{value!r} is not a count or a percentage, use e.g. 1 or 25%")


_DURATION_PART = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<unit>ms|s|m|h)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """Seconds from ``30`` or ``"30s"``, ``"1m30s"``, ``"500ms"``, ``"1h"``, as Knative and
    Kubernetes users write them; raise ``ValueError`` with a message for people."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a duration, use e.g. 30s or 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        parts = list(_DURATION_PART.finditer(text))
        if not parts or "".join(p.group(0) for p in parts) != text:
            raise ValueError(f"{value!r} is not a duration, use e.g. 30s, 1m30s or 500ms")
        seconds = sum(float(p["number"]) * _DURATION_SECONDS[p["unit"]] for p in parts)
    if seconds < 0:
        raise ValueError(f"{value!r} must not be negative")
    return seconds


def parse_percent(value: object) -> float:
    """A percentage written ``"200%"`` or ``200`` (Knative's ``*-percentage`` settings)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a percentage, use e.g. 200%")
    if isinstance(value, str):
        text = value.strip().removesuffix("%").strip()
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a percentage, use e.g. 200%") from None
    return float(value)
