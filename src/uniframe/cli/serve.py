"""``uniframe serve``: the model server as a plain process (the ``process`` runtime).

The command execs ``python -m uniframe.serve`` so the serving process is the
very same lean program that runs inside images, without the CLI's imports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from uniframe.cli.app import app, fail

_PICKLES = {".pkl", ".pickle", ".joblib"}


@app.command()
def serve(
    model: Path = typer.Argument(..., help="ONNX model file"),
    name: str = typer.Option(None, "--name", help="model name (default: the file's stem)"),
    version: str = typer.Option("1", "--model-version", help="model version"),
    host: str = typer.Option("0.0.0.0", "--host"),
    port: int = typer.Option(8080, "--port"),
    threads: int = typer.Option(1, "--threads", help="ONNX Runtime intra-op threads"),
    max_body_size: str = typer.Option("64Mi", "--max-body-size", help="larger bodies get 413"),
    access_log: bool = typer.Option(False, "--access-log", help="log every request"),
) -> None:
    """Serve an ONNX model over the Open Inference Protocol v2."""
    if model.suffix in _PICKLES:
        raise fail(
            f"{model}: scikit-learn models are converted to ONNX before serving; run "
            f"'uniframe convert {model} -o {model.with_suffix('.onnx')}' and serve the .onnx file"
        )
    if not model.is_file():
        raise fail(f"{model}: no such model file")
    argv = [sys.executable, "-m", "uniframe.serve", str(model), "--model-version", version,
            "--host", host, "--port", str(port), "--threads", str(threads),
            "--max-body-size", max_body_size]
    if name:
        argv += ["--name", name]
    if access_log:
        argv.append("--access-log")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


@app.command()
def convert(
    model: Path = typer.Argument(..., help="pickled or joblib-dumped scikit-learn estimator"),
    output: Path = typer.Option(..., "-o", "--output", help="ONNX file to write"),
) -> None:
    """Convert a scikit-learn estimator to ONNX (inputs FP32 rows named X)."""
    from uniframe.build.sklearn_onnx import convert_pickle
    from uniframe.cli.app import console
    from uniframe.extras import require

    require("uniframe convert")

    data = convert_pickle(model)
    output.write_bytes(data)
    console.print(f"wrote {output} ({len(data)} bytes)")
