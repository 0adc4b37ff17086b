"""The Typer application every command module attaches to, and its error boundary.

Command modules import ``app`` from here and decorate their functions; ``main``
runs the app and turns every :class:`~uniframe.errors.UniframeError` into one
clear line on stderr and exit status 2, so users never see a traceback for a
mistake they can fix.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from uniframe.errors import UniframeError

app = typer.Typer(
    name="uniframe",
    help="Build and run AI inference as unikernels, VMs, containers and processes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

err_console = Console(stderr=True, highlight=False)
console = Console(highlight=False)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print an error for the user and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def run() -> None:
    try:
        app()
    except UniframeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
