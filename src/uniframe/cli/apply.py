"""``uniframe apply -f`` and ``uniframe delete``: desired state in and out of the daemon.

Every file is checked by the daemon (a dry run) before any is applied, so a
typo in the third file leaves the first two untouched; each file is then one
transaction. Relative paths in a spec are relative to its file, as
everywhere in uniframe: the daemon runs on this host, so the client sends
the file's directory along.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.markup import escape

from uniframe.cli import progress
from uniframe.cli.app import app, console, err_console, fail
from uniframe.cli.remote import DAEMON_OPTION, connect, split_ref
from uniframe.control.api.client import DaemonClient, SpecRejectedError
from uniframe.errors import SpecError

STDIN = "-"


def _read(name: str) -> tuple[str, str, Path]:
    """``(text, source, base directory)`` of a spec file, or of stdin for ``-``."""
    if name == STDIN:
        return sys.stdin.read(), "<stdin>", Path.cwd()
    path = Path(name)
    try:
        return path.read_text(encoding="utf-8"), name, path.resolve().parent
    except FileNotFoundError:
        raise fail(f"{name}: no such file") from None
    except IsADirectoryError:
        raise fail(f"{name}: is a directory; give the spec files in it") from None
    except UnicodeDecodeError:
        raise fail(f"{name}: is not UTF-8 text; is it really a YAML spec?") from None
    except OSError as exc:
        raise fail(f"{name}: cannot read it ({exc.strerror})") from None


def _check_all(client: DaemonClient, files: list[tuple[str, str, Path]]) -> None:
    """Dry-run every file; print every problem of every file, then stop if there was one."""
    problems: list[str] = []
    for text, source, base in files:
        try:
            client.apply(text, source=source, base=base, dry_run=True)
        except SpecRejectedError as exc:
            problems += [str(p) for p in exc.problems]
    if problems:
        for line in problems:
            err_console.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)
        raise typer.Exit(2)


@app.command()
def apply(
    files: list[str] = typer.Option(..., "-f", "--filename",
                                    help="spec file to apply (repeatable; - reads stdin)"),
    wait: bool = typer.Option(False, "--wait",
                              help="wait until every applied service's rollout is complete or "
                                   "failed; exit 1 if one failed"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds --wait waits at most"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check and say what would change"),
    daemon: str = DAEMON_OPTION,
) -> None:
    """Create or update objects from spec files, like kubectl apply."""
    if files.count(STDIN) > 1:
        raise fail("-f - (stdin) can be given once")
    specs = [_read(name) for name in files]
    applied: list[dict[str, Any]] = []
    with connect(daemon) as client:
        _check_all(client, specs)
        for text, source, base in specs:
            applied += client.apply(text, source=source, base=base, dry_run=dry_run)["applied"]
        suffix = " (dry run)" if dry_run else ""
        for item in applied:
            console.print(f"{item['kind']}/{item['name']} {item['action']}{suffix}",
                          markup=False, soft_wrap=True)
        if not wait or dry_run:
            return
        targets = [progress.Target(i["kind"], i["name"], i.get("revision_digest"))
                   for i in applied if i["kind"] == "InferenceService"]
        if not progress.wait(client, targets, timeout):
            failed = [t.line for t in targets if t.outcome != "ok"]
            for line in failed:
                err_console.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)
            raise typer.Exit(1)


def _refs_in(name: str) -> list[tuple[str, str]]:
    """The ``(kind, name)`` of every document of a spec file (only those two fields matter)."""
    text, source, _ = _read(name)
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: invalid YAML: {exc}") from None
    refs = []
    for index, doc in enumerate(docs, 1):
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        kind = doc.get("kind") if isinstance(doc, dict) else None
        obj_name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(kind, str) or not isinstance(obj_name, str):
            raise SpecError(f"{source}, document {index}: needs kind and metadata.name to say "
                            "what to delete")
        refs.append((kind, obj_name))
    return refs


@app.command()
def delete(
    refs: list[str] = typer.Argument(None, help="KIND/NAME, or NAME of an InferenceService"),
    files: list[str] = typer.Option([], "-f", "--filename",
                                    help="delete the objects a spec file defines (repeatable)"),
    daemon: str = DAEMON_OPTION,
) -> None:
    """Delete objects; the daemon stops and removes their replicas."""
    targets = [split_ref(r) for r in refs or []]
    for name in files:
        targets += _refs_in(name)
    if not targets:
        raise fail("say what to delete: KIND/NAME, NAME, or -f FILE")
    with connect(daemon) as client:
        for kind, name in targets:
            deleted = client.delete(kind, name)["deleted"]
            console.print(f"{deleted['kind']}/{deleted['name']} deleted", markup=False, soft_wrap=True)
