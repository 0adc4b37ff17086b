"""``uniframe model push|ls|inspect|rm``: the model registry, through the daemon's API.

The daemon owns the registry (its store and its files); these commands parse
arguments, send the request and render the answer, so a version pushed from
one shell is what every other client and the reconciler see.

A scikit-learn pickle is converted to ONNX here, in the pushing user's own
process, and only the ONNX bytes travel: unpickling runs whatever code the
file holds, which is acceptable with the trust of the user who owns the file
and never in the daemon, which runs as root. The version records
``source_format=sklearn`` in its metadata.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from uniframe.build.modelstore import SKLEARN_SUFFIXES, parse_ref
from uniframe.cli.app import app, console, fail
from uniframe.cli.output import (
    OUTPUT_OPTION,
    age,
    check_output,
    output_option,
    print_data,
    print_fields,
    print_table,
)
from uniframe.cli.remote import DAEMON_OPTION, connect
from uniframe.extras import require

SOURCE_FORMAT = "source_format"
"""The metadata key that says what a pushed ONNX file was converted from."""

model_app = typer.Typer(help="Push, list, inspect and remove models in the model registry.",
                        no_args_is_help=True)
app.add_typer(model_app, name="model")


def _metadata(pairs: list[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise fail(f"--meta {pair!r}: write KEY=VALUE, e.g. --meta owner=ml-team")
        meta[key] = value
    return meta


def tensors(tensors: list[dict[str, Any]]) -> str:
    return ", ".join(f"{t['name']} {t['datatype']}[{','.join(str(d) for d in t['shape'])}]"
                     for t in tensors)


def print_models(models: list[dict[str, Any]], name: str | None = None) -> None:
    if not models:
        console.print("no models" + (f" named {name}" if name else "")
                      + "; push one with `uniframe model push FILE --name NAME`", markup=False, soft_wrap=True)
        return
    print_table(("NAME", "VERSION", "FORMAT", "SIZE", "SHA256", "INPUTS", "AGE"),
                [(m["name"], m["version"], m["format"], f"{m['size']:,}", m["sha256"][:12],
                  tensors(m["inputs"]), age(m["created_at"])) for m in models],
                wrap=("INPUTS",))


@contextmanager
def _as_onnx(file: Path, metadata: dict[str, str]) -> Iterator[Path]:
    """``file`` itself, or its ONNX conversion in a temporary file if it is a pickle.

    Converting a pickle records ``source_format=sklearn`` in ``metadata``
    (overriding a ``--meta`` of that key: it states a fact of this push).
    """
    if file.suffix.lower() not in SKLEARN_SUFFIXES:
        yield file
        return
    require(f"uniframe model push {file.name} (converting scikit-learn to ONNX)")
    from uniframe.build.sklearn_onnx import convert_pickle

    data = convert_pickle(file)
    metadata[SOURCE_FORMAT] = "sklearn"
    with tempfile.TemporaryDirectory(prefix="uniframe-push-") as tmp:
        converted = Path(tmp) / f"{file.stem}.onnx"
        converted.write_bytes(data)
        yield converted


@model_app.command("push")
def push(
    file: Path = typer.Argument(..., help="an .onnx file, or a scikit-learn .pkl/.pickle/.joblib "
                                          "(converted to ONNX here, before it is sent: "
                                          "unpickling runs the file's code, so push only "
                                          "models you trust)"),
    name: str = typer.Option(..., "--name", help="the model's name, e.g. iris"),
    version: str = typer.Option(None, "--version",
                                help="a number or a label (default: the next number)"),
    meta: list[str] = typer.Option([], "--meta", help="KEY=VALUE to record, repeatable"),
    output: str = OUTPUT_OPTION,
    daemon: str = DAEMON_OPTION,
) -> None:
    """Store a model as a new version (identical bytes return the version that has them)."""
    check_output(output)
    metadata = _metadata(meta)
    if not file.is_file():
        raise fail(f"{file}: no such model file")
    with _as_onnx(file, metadata) as onnx_file, connect(daemon) as client:
        pushed = client.push_model(onnx_file, name, version=version, format="onnx",
                                   metadata=metadata)
    model = pushed["model"]
    if output != "table":
        print_data(pushed, output)
    elif pushed["created"]:
        console.print(f"pushed {model['name']}@{model['version']}  ({model['format']}, "
                      f"{model['size']} bytes, sha256 {model['sha256'][:12]})", markup=False, soft_wrap=True)
    else:
        console.print(f"{model['name']}@{model['version']} already holds these bytes "
                      f"(sha256 {model['sha256'][:12]}); nothing pushed", markup=False, soft_wrap=True)


@model_app.command("ls")
def ls(
    name: str = typer.Argument(None, help="only this model's versions"),
    output: str = OUTPUT_OPTION,
    daemon: str = DAEMON_OPTION,
) -> None:
    """List model versions."""
    check_output(output)
    with connect(daemon) as client:
        models = client.models(name)
    if output != "table":
        print_data({"models": models}, output)
    else:
        print_models(models, name)


@model_app.command("inspect")
def inspect(
    ref: str = typer.Argument(..., help="NAME@VERSION, e.g. iris@1"),
    output: str = output_option("yaml"),
    daemon: str = DAEMON_OPTION,
) -> None:
    """Show everything the registry knows about one version, and what uses it (YAML unless -o)."""
    check_output(output)
    name, version = parse_ref(ref)
    with connect(daemon) as client:
        model = client.model(name, version)
    if output != "table":
        print_data(model, output)
        return
    print_fields([
        ("Model", f"{model['name']}@{model['version']}"),
        ("Format", model["format"]),
        ("Size", f"{model['size']:,} bytes"),
        ("SHA256", model["sha256"]),
        ("Inputs", tensors(model["inputs"])),
        ("Outputs", tensors(model["outputs"])),
        ("Metadata", ", ".join(f"{k}={v}" for k, v in sorted(model.get("metadata", {}).items()))
         or "-"),
        ("Used by", ", ".join(model.get("used_by", [])) or "-"),
        ("Path", model.get("path", "-")),
        ("Age", age(model["created_at"])),
    ])


@model_app.command("rm")
def rm(
    ref: str = typer.Argument(..., help="NAME@VERSION, e.g. iris@1"),
    daemon: str = DAEMON_OPTION,
) -> None:
    """Remove a version; refused while an applied spec uses it."""
    name, version = parse_ref(ref)
    with connect(daemon) as client:
        removed = client.remove_model(name, version)["removed"]
    console.print(f"removed {removed['name']}@{removed['version']}", markup=False, soft_wrap=True)
