"""The daemon connection every client command shares: ``--daemon`` and ``$UNIFRAME_DAEMON``.

The commands that administer the control plane (apply, get, describe,
delete, logs, events, rollout, model) are clients of ``uniframe daemon``
(over its unix socket unless told otherwise, with its token);
they hold no state and never open the store themselves, so what they show
is what the daemon knows, and two shells always agree.
"""

from __future__ import annotations

from typing import Any

import typer

from uniframe.control.api.client import DAEMON_ENV, DaemonClient

DAEMON_OPTION: Any = typer.Option(
    None, "--daemon", envvar=DAEMON_ENV, show_envvar=True,
    help="the daemon's API: unix:///PATH or http(s)://HOST:PORT (default: its unix socket in "
         "the state directory); the token comes from $UNIFRAME_TOKEN or the daemon's token file")

SERVICE_KIND = "InferenceService"

# What users type for a kind -> the kind the API knows.
KIND_ALIASES = {
    "inferenceservice": SERVICE_KIND, "inferenceservices": SERVICE_KIND, "isvc": SERVICE_KIND,
    "svc": SERVICE_KIND, "service": SERVICE_KIND, "services": SERVICE_KIND,
    "workload": "Workload", "workloads": "Workload",
}


def connect(url: str | None) -> DaemonClient:
    return DaemonClient(url)


def object_kind(text: str) -> str | None:
    """The API kind for what a user typed (``svc``, ``inferenceservices``, ...), else None."""
    return KIND_ALIASES.get(text.lower())


def split_ref(ref: str) -> tuple[str, str]:
    """``KIND/NAME`` or ``NAME`` (an InferenceService) -> ``(kind, name)``."""
    kind, slash, name = ref.rpartition("/")
    if not slash:
        return SERVICE_KIND, ref
    return object_kind(kind) or kind, name
