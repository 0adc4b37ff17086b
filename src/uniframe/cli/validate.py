"""``uniframe validate``: check spec files before anything is built or started.

Every document of every file is checked and every problem printed, one per
line on stderr, so a user fixes a file in one pass. Files a spec refers to
that do not exist yet (a model still to be trained) are warnings, not errors:
validation is about the spec, the build reports missing inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from uniframe.cli.app import app, console, err_console, fail
from uniframe.spec import Document, check_file


@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="spec files (YAML, one or more documents each)"),
    output: str = typer.Option("text", "-o", "--output", help="text, or json for the normalised documents"),
) -> None:
    """Check spec files; exit 0 when all are valid, 2 otherwise."""
    if output not in ("text", "json"):
        raise fail(f"--output {output!r}: use text or json")
    documents: list[Document] = []
    invalid = False
    for path in files:
        report = check_file(path)
        documents.extend(report.documents)
        if output == "text":
            for doc in report.documents:
                console.print(f"[green]ok[/]  {escape(doc.source)}: {doc.kind}/{doc.name} "
                              f"(document {doc.index})", soft_wrap=True)
                for field, local in doc.spec.local_paths().items():
                    if not local.exists():
                        err_console.print(f"[yellow]warning:[/] {escape(doc.where)}: {field}: "
                                          f"{escape(str(local))} does not exist (yet)", soft_wrap=True)
        for problem in report.problems:
            err_console.print(f"[bold red]error:[/] {escape(str(problem))}", soft_wrap=True)
        invalid = invalid or not report.ok
    if output == "json":
        typer.echo(json.dumps([doc.spec.to_dict() for doc in documents], indent=2))
    if invalid:
        raise typer.Exit(2)
