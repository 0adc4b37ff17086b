"""The Typer application every command module attaches to, and its error boundary.

Command modules import ``app`` from here and decorate their functions. The
boundary lives in the root command group, so it holds wherever the app runs
(the console script, or Typer's test runner): every
:class:`~uniframe.errors.UniframeError` becomes one clear line on stderr and
exit status 2, so users never see a traceback for a mistake they can fix.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from uniframe.errors import UniframeError

err_console = Console(stderr=True, highlight=False)
console = Console(highlight=False)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print an error for the user and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


class _Boundary(TyperGroup):
    # ``ctx`` is click's Context, which newer typer releases vendor under a private name.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UniframeError as exc:
            raise fail(str(exc)) from None


app = typer.Typer(
    name="uniframe",
    help="Build and run AI inference as unikernels, VMs, containers and processes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Boundary,
)


def run() -> None:
    try:
        app()
    except UniframeError as exc:  # raised outside a command (e.g. while parsing)
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
