"""The JSON the API answers with, built from store records in one place.

Routes, the OpenAPI document and the CLI's tables all read these shapes, so
an object looks the same whether it comes from ``GET /v1/objects`` or from
``GET /v1/objects/{kind}/{name}``: its spec as applied, where its service
listens, and a status summary a table can show without a second request.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from uniframe.control.store import Endpoint, ObjectRecord, ReplicaRecord

ENDPOINT_HOST = "127.0.0.1"
"""The proxy binds every service endpoint on the loopback interface."""


def endpoint_json(endpoint: Endpoint | None) -> dict[str, Any] | None:
    if endpoint is None:
        return None
    return {"host": ENDPOINT_HOST, "port": endpoint.host_port}


def desired_replicas(obj: ObjectRecord) -> int | None:
    """``spec.replicas`` as applied; None under autoscaling (the count is not fixed)."""
    body = obj.spec.get("spec", {})
    value = body.get("replicas") if isinstance(body, dict) else None
    return value if isinstance(value, int) else None


def replica_summary(obj: ObjectRecord, replicas: list[ReplicaRecord]) -> dict[str, Any]:
    """How many replicas exist and are ready, and how many of each state."""
    states: dict[str, int] = {}
    for r in replicas:
        states[r.state] = states.get(r.state, 0) + 1
    return {"desired": desired_replicas(obj), "total": len(replicas),
            "ready": states.get("ready", 0), "states": dict(sorted(states.items()))}


def replica_json(replica: ReplicaRecord) -> dict[str, Any]:
    return asdict(replica)


def object_json(obj: ObjectRecord, replicas: list[ReplicaRecord], endpoint: Endpoint | None,
                rollout: dict[str, Any] | None) -> dict[str, Any]:
    return {"kind": obj.kind, "name": obj.name, "generation": obj.generation,
            "digest": obj.digest, "created_at": obj.created_at, "updated_at": obj.updated_at,
            "deleted": obj.deleted, "spec": obj.spec, "endpoint": endpoint_json(endpoint),
            "status": {"replicas": replica_summary(obj, replicas), "rollout": rollout}}
