"""``uniframe model push|ls|inspect|rm``: the model registry from the command line.

The commands work on the local state store (``$UNIFRAME_STORE``, else
``<data>/state.db``) through :class:`~uniframe.control.registry.Registry`;
they only parse arguments and render, so the daemon's API can take the
registry's place behind them without changing what users type or see.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.table import Table

from uniframe.cli.app import app, console, fail

model_app = typer.Typer(help="Push, list, inspect and remove models in the model registry.",
                        no_args_is_help=True)
app.add_typer(model_app, name="model")

OUTPUTS = ("table", "json", "yaml")


def _check_output(output: str, allowed: tuple[str, ...] = OUTPUTS) -> None:
    if output not in allowed:
        raise fail(f"-o {output!r}: use one of {', '.join(allowed)}")


def _metadata(pairs: list[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise fail(f"--meta {pair!r}: write KEY=VALUE, e.g. --meta owner=ml-team")
        meta[key] = value
    return meta


def _tensors(tensors: list[dict[str, Any]]) -> str:
    return ", ".join(f"{t['name']} {t['datatype']}[{','.join(str(d) for d in t['shape'])}]"
                     for t in tensors)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _print(data: Any, output: str) -> None:
    if output == "json":
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        typer.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@model_app.command("push")
def push(
    file: Path = typer.Argument(..., help="an .onnx file, or a scikit-learn .pkl/.joblib "
                                          "(converted to ONNX now)"),
    name: str = typer.Option(..., "--name", help="the model's name, e.g. iris"),
    version: str = typer.Option(None, "--version",
                                help="a number or a label (default: the next number)"),
    meta: list[str] = typer.Option([], "--meta", help="KEY=VALUE to record, repeatable"),
    output: str = typer.Option("table", "-o", "--output", help="table, json or yaml"),
) -> None:
    """Store a model as a new version (identical bytes return the version that has them)."""
    from uniframe.control.registry import Registry

    _check_output(output)
    metadata = _metadata(meta)
    with Registry.open() as registry:
        pushed = registry.push(file, name, version=version, metadata=metadata)
    model = pushed.model
    if output != "table":
        _print({**model.to_json(), "created": pushed.created}, output)
    elif pushed.created:
        console.print(f"pushed {model.ref}  ({model.format}, {model.size} bytes, "
                      f"sha256 {model.sha256[:12]})")
    else:
        console.print(f"{model.ref} already holds these bytes (sha256 {model.sha256[:12]}); "
                      "nothing pushed")


@model_app.command("ls")
def ls(
    name: str = typer.Argument(None, help="only this model's versions"),
    output: str = typer.Option("table", "-o", "--output", help="table, json or yaml"),
) -> None:
    """List model versions."""
    from uniframe.control.registry import Registry

    _check_output(output)
    with Registry.open() as registry:
        models = registry.list(name)
    if output != "table":
        _print([m.to_json() for m in models], output)
        return
    if not models:
        console.print("no models" + (f" named {name}" if name else "")
                      + "; push one with `uniframe model push FILE --name NAME`")
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "VERSION", "FORMAT", "SIZE", "SHA256", "INPUTS", "PUSHED"):
        table.add_column(col, no_wrap=col != "INPUTS")
    for m in models:
        table.add_row(m.name, m.version, m.format, f"{m.size:,}", m.sha256[:12],
                      _tensors(m.inputs), _when(m.created_at))
    console.print(table)


@model_app.command("inspect")
def inspect(
    ref: str = typer.Argument(..., help="NAME@VERSION, e.g. iris@1"),
    output: str = typer.Option("yaml", "-o", "--output", help="yaml or json"),
) -> None:
    """Show everything the registry knows about one version, and what uses it."""
    from uniframe.build.modelstore import parse_ref
    from uniframe.control.registry import Registry

    _check_output(output, ("yaml", "json"))
    name, version = parse_ref(ref)
    with Registry.open() as registry:
        model = registry.inspect(name, version)
        data = {**model.to_json(), "path": str(registry.resolve(model.ref)),
                "used_by": registry.users(name, version)}
    _print(data, output)


@model_app.command("rm")
def rm(ref: str = typer.Argument(..., help="NAME@VERSION, e.g. iris@1")) -> None:
    """Remove a version; refused while an applied spec uses it."""
    from uniframe.build.modelstore import parse_ref
    from uniframe.control.registry import Registry

    name, version = parse_ref(ref)
    with Registry.open() as registry:
        model = registry.remove(name, version)
    console.print(f"removed {model.ref}")
