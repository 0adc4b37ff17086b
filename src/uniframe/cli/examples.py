"""``uniframe examples``: write the example models demos and tests use."""

from __future__ import annotations

from pathlib import Path

import typer

from uniframe.cli.app import app, console
from uniframe.extras import require

examples_app = typer.Typer(help="Write example models (trained here, no download).", no_args_is_help=True)
app.add_typer(examples_app, name="examples")


@examples_app.command("iris")
def iris(directory: Path = typer.Argument(..., help="Directory to write iris.onnx into")) -> None:
    """Train the iris classifier (LogisticRegression) and write it as ONNX."""
    require("uniframe examples iris")
    from uniframe.build.examples import write_iris

    path = write_iris(directory)
    console.print(f"wrote {path} ({path.stat().st_size} bytes): input X FP32 [-1,4]; "
                  "outputs label INT64 [-1], probabilities FP32 [-1,3]")
