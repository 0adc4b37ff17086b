"""Waiting for rollouts, with their progress on screen: ``apply --wait``, ``rollout status -w``.

A wait is about one revision: the one the apply answered with
(``revision_digest``). The rollout the daemon reports counts only once it
rolls to that digest, so a rollout that completed before the apply can never
end the wait early. It ends when the rollout is complete with every replica
ready, or paused as a canary waiting for the user (both success), or rolled
back or failed (failure); or when the time is up.

On a terminal the lines redraw in place (rich ``Live``); otherwise a line is
printed each time it changes, which reads well in CI logs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from uniframe.cli.app import console
from uniframe.control.api.client import DaemonClient
from uniframe.errors import NotFoundError

POLL_SECONDS = 0.5
SUCCESS = ("complete", "paused")
FAILURE = ("rolled-back", "failed")


@dataclass
class Target:
    """One object to wait for, and what the last look at it said."""

    kind: str
    name: str
    digest: str | None  # None: whatever revision the object asks for now
    line: str = "waiting for the daemon"
    outcome: str | None = None  # "ok" or "failed" once settled

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"


def _ready(obj: dict[str, Any]) -> tuple[int, int]:
    replicas = obj["status"]["replicas"]
    desired = replicas["desired"] if replicas["desired"] is not None else replicas["total"]
    return int(replicas["ready"]), int(desired)


def look(target: Target, obj: dict[str, Any]) -> None:
    """Update ``target`` from the object's JSON: its progress line and, once settled, outcome."""
    digest = target.digest or obj["status"].get("revision_digest")
    rollout = obj["status"].get("rollout")
    ready, desired = _ready(obj)
    counts = f"{ready}/{desired} ready"
    if rollout is None or rollout.get("target_digest") != digest:
        target.line = f"{target.ref}: {counts}, waiting for the reconciler to start the rollout"
        return
    state = rollout["state"]
    revision = f"revision {rollout['revision']}" if rollout.get("revision") else "rollout"
    target.line = f"{target.ref}: {counts}, {revision} {state}: {rollout['message']}"
    if state in FAILURE:
        target.outcome = "failed"
    elif state == "paused" or (state == "complete" and ready >= desired
                               and obj["status"]["replicas"]["total"] == desired):
        target.outcome = "ok"


def _render(targets: list[Target]) -> Group:
    rows: list[Any] = []
    for t in targets:
        if t.outcome is None:
            rows.append(Spinner("dots", Text(t.line)))
        else:
            mark = "[green]✓[/]" if t.outcome == "ok" else "[red]✗[/]"
            rows.append(Text.from_markup(mark + " ") + Text(t.line))
    return Group(*rows)


def wait(client: DaemonClient, targets: list[Target], timeout: float) -> bool:
    """Poll until every target settles or ``timeout`` seconds pass; True if all succeeded."""
    deadline = time.monotonic() + timeout
    printed: dict[str, str] = {}
    live = Live(_render(targets), console=console, refresh_per_second=8, transient=False) \
        if console.is_terminal else None
    if live is not None:
        live.start()
    try:
        while True:
            for t in targets:
                if t.outcome is not None:
                    continue
                try:
                    look(t, client.object(t.kind, t.name))
                except NotFoundError:
                    t.line, t.outcome = f"{t.ref}: deleted while waiting", "failed"
            if live is not None:
                live.update(_render(targets))
            else:
                for t in targets:
                    if printed.get(t.ref) != t.line:
                        printed[t.ref] = t.line
                        console.print(t.line, markup=False, soft_wrap=True)
            if all(t.outcome is not None for t in targets):
                return all(t.outcome == "ok" for t in targets)
            if time.monotonic() >= deadline:
                for t in targets:
                    if t.outcome is None:
                        t.outcome = "failed"
                        t.line += f" (gave up after {timeout:g} s)"
                if live is not None:
                    live.update(_render(targets))
                return False
            time.sleep(POLL_SECONDS)
    finally:
        if live is not None:
            live.stop()
