"""How read commands print: a readable table by default, the API's JSON or YAML on request.

Every command that shows something takes the same ``-o/--output`` with the
same choices (``table``, ``json``, ``yaml``), made here by
:func:`output_option` and checked by :func:`check_output`, so a script
learns the flag once. ``-o json`` prints exactly what the daemon (or the
local store) answered, so a script gets the same document as ``curl``
would; ``-o yaml`` is that document through ``yaml.safe_dump``. Tables
never wrap or cut cells when stdout is not a terminal, because scripts read
them as often as people do.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from uniframe.cli.app import console, fail

OUTPUTS = ("table", "json", "yaml")


def output_option(default: str = "table") -> Any:
    """The ``-o/--output`` option; ``inspect`` commands default to their whole document."""
    return typer.Option(default, "-o", "--output", help="table, json or yaml")


OUTPUT_OPTION: Any = output_option()


def check_output(output: str) -> None:
    """Refuse an unknown format before any work is done (a build, a daemon round trip)."""
    if output not in OUTPUTS:
        raise fail(f"-o {output!r}: use one of {', '.join(OUTPUTS)}")


def print_data(data: Any, output: str) -> None:
    """JSON or YAML of ``data``, nothing else on stdout."""
    if output == "json":
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        typer.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


def print_fields(rows: Iterable[tuple[str, object]]) -> None:
    """One thing as ``label: value`` lines, the table view of an ``inspect``."""
    items = list(rows)
    width = max((len(label) for label, _ in items), default=0) + 1
    for label, value in items:
        typer.echo(f"{label + ':':<{width}} {value}".rstrip())


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]],
                wrap: Sequence[str] = ()) -> None:
    """Columns without borders; on a terminal only the columns named in ``wrap`` may wrap."""
    terminal = console.is_terminal
    table = Table(box=None, header_style="bold", pad_edge=False)
    for header in headers:
        table.add_column(header, no_wrap=not terminal or header not in wrap, overflow="fold")
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    if terminal:
        console.print(table)
        return
    buffer = io.StringIO()
    Console(file=buffer, width=10_000, color_system=None, highlight=False).print(table)
    typer.echo("\n".join(line.rstrip() for line in buffer.getvalue().splitlines()))


def age(ts: float | None, now: float | None = None) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``: how long ago, as tables show it."""
    if ts is None:
        return "-"
    seconds = max(0, int((now or time.time()) - ts))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
