"""``uniframe logs`` and ``uniframe events``: what replicas print and what happened to objects.

``logs`` asks the daemon first (a service's replicas, or one replica by id),
and falls back to the replicas on this host's disk when the daemon does not
know the target or does not run, so replicas started by ``uniframe run``
keep their logs command.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import typer
import yaml

from uniframe.cli.app import app, console
from uniframe.cli.get import print_events
from uniframe.cli.output import OUTPUT_OPTION, check_output, print_data, when
from uniframe.cli.remote import DAEMON_OPTION, connect, split_ref
from uniframe.control.api.client import DaemonClient, DaemonUnavailableError
from uniframe.control.api.logs import tail as tail_of
from uniframe.errors import NotFoundError
from uniframe.runtime.registry import Capability, entry, find

WATCH_SECONDS = 0.5


def _primed(stream: Iterator[bytes]) -> Iterator[bytes] | None:
    """The stream with its first chunk already fetched, or None if the daemon said 404."""
    try:
        first = next(stream)
    except StopIteration:
        return iter(())
    except NotFoundError:
        return None

    def chain() -> Iterator[bytes]:
        yield first
        yield from stream

    return chain()


def _from_daemon(client: DaemonClient, target: str, tail: int | None,
                 follow: bool) -> Iterator[bytes] | None:
    kind, name = split_ref(target)
    stream = _primed(client.object_logs(kind, name, tail=tail, follow=follow))
    if stream is None and "/" not in target:
        stream = _primed(client.replica_logs(target, tail=tail, follow=follow))
    return stream


def _from_host(target: str, tail: int | None, follow: bool) -> Iterator[bytes]:
    """A replica on this host's disk (``uniframe run``), as ``uniframe ps`` lists them."""
    driver, replica = find(target)
    if follow:
        entry(driver.kind).require(Capability.LIVE_LOGS, f"logs -f {target}")
    data, offset = tail_of(driver.logs(replica.id), tail)
    yield data
    if follow:
        yield from driver.logs(replica.id, follow=True, offset=offset)


@app.command()
def logs(
    target: str = typer.Argument(..., help="NAME of a service (or KIND/NAME), or a replica id "
                                           "(unique prefix) or name"),
    tail: int = typer.Option(None, "--tail", min=0, help="only the last N lines (of each replica)"),
    follow: bool = typer.Option(False, "-f", "--follow",
                                help="keep printing until the replica stops (or the service "
                                     "is deleted)"),
    daemon: str = DAEMON_OPTION,
) -> None:
    """Print a service's or a replica's console log (VMs) or output (containers, processes)."""
    stream: Iterator[bytes] | None = None
    with connect(daemon) as client:
        try:
            stream = _from_daemon(client, target, tail, follow)
        except DaemonUnavailableError:
            stream = None
        if stream is None:
            stream = _from_host(target, tail, follow)
        out = sys.stdout.buffer
        try:
            for chunk in stream:
                out.write(chunk)
                out.flush()
        except KeyboardInterrupt:
            pass


def _event_line(e: dict[str, Any]) -> str:
    replica = f" [{e['replica_id']}]" if e.get("replica_id") else ""
    return (f"{when(e['time'])}  {e['type']:<7}  {e['kind']}/{e['name']}{replica}  "
            f"{e['reason']}: {e['message']}")


def _emit(events: list[dict[str, Any]], output: str) -> None:
    """Events as they arrive while watching: a line each, a JSON line each, or YAML documents."""
    for e in events:
        if output == "json":
            typer.echo(json.dumps(e, sort_keys=True))
        elif output == "yaml":
            typer.echo("---\n" + yaml.safe_dump(e, sort_keys=False).rstrip())
        else:
            console.print(_event_line(e), markup=False, soft_wrap=True)


@app.command()
def events(
    target: str = typer.Argument(None, help="only this object's: NAME of a service, or KIND/NAME"),
    watch: bool = typer.Option(False, "-w", "--watch", help="keep printing new events"),
    tail: int = typer.Option(None, "--tail", min=0, help="only the newest N"),
    output: str = OUTPUT_OPTION,
    daemon: str = DAEMON_OPTION,
) -> None:
    """Show what happened to objects and replicas, oldest first."""
    check_output(output)
    kind, name = split_ref(target) if target is not None else (None, None)
    with connect(daemon) as client:
        found = client.events(kind=kind, name=name, tail=tail)
        if not watch:
            if output != "table":
                print_data({"events": found}, output)
            else:
                print_events(found, with_object=target is None)
            return
        _emit(found, output)
        last = found[-1]["id"] if found else _newest_id(client, kind, name)
        try:
            while True:
                time.sleep(WATCH_SECONDS)
                fresh = client.events(kind=kind, name=name, after=last)
                _emit(fresh, output)
                if fresh:
                    last = fresh[-1]["id"]
        except KeyboardInterrupt:
            pass


def _newest_id(client: DaemonClient, kind: str | None, name: str | None) -> int:
    newest = client.events(kind=kind, name=name, tail=1)
    return int(newest[0]["id"]) if newest else 0
