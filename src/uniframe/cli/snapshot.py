"""``uniframe snapshot ls | inspect | rm``: the snapshot templates kept on this host.

A template is what a running microVM replica became when it was
snapshotted (its device state and a copy of its RAM, under
``<state>/snapshots/<id>/``); clones are restored from it instead of booting.
These commands read and delete the store directly, like ``ps`` reads the
replica records, so they work with or without a daemon. Removing a template
never disturbs a clone already running from it (the clone's mapping keeps
the RAM file alive until it exits); it only stops new clones.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import typer

from uniframe.cli.app import app, err_console
from uniframe.cli.output import (
    OUTPUT_OPTION,
    age,
    check_output,
    output_option,
    print_data,
    print_fields,
    print_table,
)
from uniframe.runtime.qemu.snapshot import StoredSnapshot, snapshot_store

snapshot_app = typer.Typer(help="List, inspect and remove snapshot templates (microVM replicas saved "
                                "for fast restores).", no_args_is_help=True)
app.add_typer(snapshot_app, name="snapshot")


def _mb(n: object) -> str:
    return f"{int(n) / 1e6:.1f} MB" if isinstance(n, int | float) else "-"


def _created(stored: StoredSnapshot) -> float | None:
    try:
        return datetime.fromisoformat(stored.snapshot.created_at).timestamp()
    except ValueError:
        return None


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


@snapshot_app.command("ls")
def snapshot_ls(output: str = OUTPUT_OPTION) -> None:
    """List the snapshots, oldest first."""
    check_output(output)
    snaps = snapshot_store().list()
    if output != "table":
        print_data([s.to_json() for s in snaps], output)
        return
    print_table(("ID", "DRIVER", "SOURCE", "IMAGE", "CREATED", "SIZE", "PAUSE"),
                [(s.snapshot.id, s.snapshot.driver, s.snapshot.source_replica,
                  _short(s.snapshot.image_digest), age(_created(s)),
                  _mb(s.snapshot.size_bytes), f"{s.stats.get('pause_ms', '-')} ms")
                 for s in snaps])


@snapshot_app.command("inspect")
def snapshot_inspect(
    ref: str = typer.Argument(..., help="snapshot id or unique prefix"),
    output: str = output_option("json"),
) -> None:
    """Print a snapshot's record, the facts a restore must match, and its measured figures."""
    check_output(output)
    stored = snapshot_store().get(ref)
    if output != "table":
        print_data({**stored.to_json(), "dir": str(stored.dir)}, output)
        return
    s = stored.snapshot
    stats: dict[str, Any] = stored.stats
    print_fields([
        ("Snapshot", s.id),
        ("Driver", s.driver),
        ("Source replica", s.source_replica),
        ("Image", s.image_digest),
        ("Created", s.created_at),
        ("Size", f"{_mb(s.size_bytes)} (device state {_mb(stats.get('state_bytes'))}, "
                 f"RAM copied {_mb(stats.get('ram_copied_bytes'))})"),
        ("Pause", f"{stats.get('pause_ms', '-')} ms (save {stats.get('save_ms', '-')} ms)"),
        ("QEMU", f"{stored.facts.get('qemu_version', '-')} ({stored.facts.get('qemu_sha256', '-')})"),
        ("Accelerator", f"{stored.facts.get('accel', '-')}, CPU {stored.facts.get('cpu', '-')}"),
        ("Valid for", s.valid_for),
        ("Directory", stored.dir),
    ])


@snapshot_app.command("rm")
def snapshot_rm(refs: list[str] = typer.Argument(..., help="snapshots to remove")) -> None:
    """Remove snapshots (clones running from one keep running)."""
    store = snapshot_store()
    for ref in refs:
        stored = store.remove(ref)
        err_console.print(f"removed snapshot {stored.snapshot.id} (of replica "
                          f"{stored.snapshot.source_replica})")
