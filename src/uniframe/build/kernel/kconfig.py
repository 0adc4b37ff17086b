"""Reading Kconfig files and checking that a build got the options it asked for.

``make olddefconfig`` never fails: an option whose ``depends on`` is not met is
dropped without a word, and a misspelt option is ignored. A kernel built from
such a config boots, then misses a device or a system call far from the cause.
:func:`verify_options` turns that into a build error that names each option.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from uniframe.errors import BuildError

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")

# None stands for "is not set" (or absent, which Kconfig treats the same).
Options = dict[str, str | None]


def parse_options(text: str) -> Options:
    """Parse a .config or a fragment; a later line wins, as in merge_config.sh."""
    options: Options = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := _SET.match(line):
            options[m[1]] = m[2]
        elif m := _UNSET.match(line):
            options[m[1]] = None
    return options


def count_enabled(config: Mapping[str, str | None]) -> int:
    """Number of built-in (``=y``) options: the size of the kernel's feature set."""
    return sum(1 for value in config.values() if value == "y")


@dataclass(frozen=True)
class Mismatch:
    """One option of the fragment that the final .config does not honour."""

    option: str
    wanted: str | None
    got: str | None

    def __str__(self) -> str:
        return f"{self.option}: wanted {_show(self.wanted)}, got {_show(self.got)}"


def _show(value: str | None) -> str:
    return "not set" if value is None else f"={value}"


def mismatches(wanted: Mapping[str, str | None],
               final: Mapping[str, str | None]) -> list[Mismatch]:
    """Options of ``wanted`` whose value differs in ``final`` (absent counts as not set)."""
    found: list[Mismatch] = []
    for option, value in wanted.items():
        got = final.get(option)
        if value in (None, "n"):
            if got not in (None, "n"):
                found.append(Mismatch(option, None, got))
        elif got != value:
            found.append(Mismatch(option, value, got))
    return found


def verify_options(fragment_text: str, config_text: str, *, where: str = "the fragment") -> None:
    """Raise :class:`BuildError` naming every fragment option the final .config lacks."""
    problems = mismatches(parse_options(fragment_text), parse_options(config_text))
    if problems:
        raise BuildError(_report(problems, where))


def _report(problems: Iterable[Mismatch], where: str) -> str:
    lines = "\n".join(f"  {p}" for p in problems)
    return (f"kernel config: Kconfig dropped or changed options that {where} asks for:\n"
            f"{lines}\n"
            "Their dependencies are not met (or the name is misspelt). Look up each option's "
            "'depends on' and 'select' lines in the kernel's Kconfig files (make menuconfig, "
            "then '/' and the option name) and add what it needs to the fragment.")
