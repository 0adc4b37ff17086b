"""``uniframe rollout status|promote|undo|history``: a service's revisions and how it moves between them.

The reconciler carries rollouts out; these commands read where one stands,
promote a paused canary, or apply an earlier revision again (which is itself
a rollout, gated on readiness like any other).
"""

from __future__ import annotations

from typing import Any

import typer

from uniframe.cli import progress
from uniframe.cli.app import app, console, fail
from uniframe.cli.output import OUTPUT_OPTION, age, check_output, print_data, print_table
from uniframe.cli.remote import DAEMON_OPTION, connect, split_ref

rollout_app = typer.Typer(help="Watch, promote and undo rollouts; list revisions.",
                          no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")

NAME_ARG: Any = typer.Argument(..., help="NAME of a service, or KIND/NAME")


def status_line(rollout: dict[str, Any]) -> str:
    revision = f"revision {rollout['revision']}" if rollout.get("revision") else "no revision yet"
    origin = f" (from {rollout['from_revision']})" if rollout.get("from_revision") else ""
    canary = (f", canary {rollout['traffic_percent']}%"
              if rollout.get("traffic_percent") is not None else "")
    return (f"{rollout['kind']}/{rollout['name']}: {revision}{origin}, {rollout['strategy']}"
            f"{canary}, {rollout['state']}: {rollout['message']} "
            f"[{rollout['updated_ready']}/{rollout['desired']} updated ready, "
            f"{rollout['old']} old]")


@rollout_app.command("status")
def status(
    ref: str = NAME_ARG,
    watch: bool = typer.Option(False, "-w", "--watch",
                               help="wait until the rollout is complete or failed; exit 1 if "
                                    "it failed"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds --watch waits at most"),
    output: str = OUTPUT_OPTION,
    daemon: str = DAEMON_OPTION,
) -> None:
    """Where the latest rollout stands."""
    check_output(output)
    kind, name = split_ref(ref)
    with connect(daemon) as client:
        if watch:
            target = progress.Target(kind, name, None)
            ok = progress.wait(client, [target], timeout)
            if not ok:
                raise fail(target.line, code=1)
            return
        rollout = client.rollout(kind, name)
    if output != "table":
        print_data(rollout, output)
    else:
        console.print(status_line(rollout), markup=False, soft_wrap=True)


@rollout_app.command("promote")
def promote(
    ref: str = NAME_ARG,
    output: str = OUTPUT_OPTION,
    daemon: str = DAEMON_OPTION,
) -> None:
    """Give a paused canary the whole service."""
    check_output(output)
    kind, name = split_ref(ref)
    with connect(daemon) as client:
        rollout = client.promote(kind, name)
    if output != "table":
        print_data(rollout, output)
    else:
        console.print(f"{kind}/{name} promoted: {rollout['message']}", markup=False, soft_wrap=True)


@rollout_app.command("undo")
def undo(
    ref: str = NAME_ARG,
    to_revision: int = typer.Option(None, "--to-revision", min=1,
                                    help="the revision to go back to (default: the previous)"),
    output: str = OUTPUT_OPTION,
    daemon: str = DAEMON_OPTION,
) -> None:
    """Apply an earlier revision again; the reconciler rolls to it."""
    check_output(output)
    kind, name = split_ref(ref)
    with connect(daemon) as client:
        obj = client.undo(kind, name, to_revision)
    if output != "table":
        print_data(obj, output)
        return
    which = f"revision {to_revision}" if to_revision else "the previous revision"
    console.print(f"{kind}/{name} rolling back to {which} (generation {obj['generation']}); "
                  f"follow it with `uniframe rollout status -w {name}`", markup=False, soft_wrap=True)


@rollout_app.command("history")
def history(
    ref: str = NAME_ARG,
    output: str = OUTPUT_OPTION,
    daemon: str = DAEMON_OPTION,
) -> None:
    """The revisions a service has run, oldest first."""
    check_output(output)
    kind, name = split_ref(ref)
    with connect(daemon) as client:
        revisions = client.revisions(kind, name)
        obj = client.object(kind, name)
    if output != "table":
        print_data({"revisions": revisions}, output)
        return
    current = obj["status"].get("revision_digest")
    print_table(("REVISION", "MODEL", "RUNTIME", "DIGEST", "AGE", "CURRENT"), [
        (r["number"], _model(r["spec"]), r["spec"].get("spec", {}).get("runtime", "-"),
         r["digest"].removeprefix("sha256:")[:12], age(r["created_at"]),
         "*" if r["digest"] == current else "")
        for r in revisions])


def _model(spec: dict[str, Any]) -> str:
    model = spec.get("spec", {}).get("model")
    if isinstance(model, dict) and "uri" in model:
        return str(model["uri"]).rsplit("/", 1)[-1]
    if isinstance(model, dict):
        return f"{model.get('name')}@{model.get('version')}"
    return str(model)
