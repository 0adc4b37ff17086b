"""The daemon's API in OpenAPI 3, served at ``/openapi.json``.

Written by hand rather than generated: the API is small, and a test holds
this document and the route table (:data:`uniframe.control.api.routes.ROUTES`)
to the same set of paths and methods, so neither can grow alone.
"""

from __future__ import annotations

from typing import Any

from uniframe.control.states import REPLICA_STATES, ROLLOUT_STATES


def _ref(schema: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{schema}"}


def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _text(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def _path(name: str, description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"},
            **({"description": description} if description else {})}


def _query(name: str, type_: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": {"type": type_, **extra},
            "description": description}


_ERROR = _json("an error: `error` says what is wrong and what to do; `errors` lists spec "
               "problems by document and field path", "Error")
_BAD = {"400": _ERROR}
_NOT_FOUND = {"404": _ERROR}
_KIND_NAME = [_path("kind", "e.g. InferenceService"), _path("name")]
_MODEL = [_path("name"), _path("version", "a number or a label")]
_TAIL = _query("tail", "integer", "only the last N lines", minimum=0)
_FOLLOW = _query("follow", "integer",
                 "1: keep the response open and stream new lines (chunked) until the replica "
                 "stops or the object is deleted", enum=[0, 1])


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}


def _obj(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


def _list(key: str, item: str) -> dict[str, Any]:
    return _obj(**{key: {"type": "array", "items": _ref(item)}})


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


PATHS: dict[str, dict[str, Any]] = {
    "/openapi.json": {"get": _op("This document", {"200": {"description": "OpenAPI 3"}})},
    "/metrics": {"get": _op("Prometheus metrics", {"200": _text("text exposition format")})},
    "/v1/apply": {"post": _op(
        "Create or update objects from spec documents (YAML or JSON); all or nothing",
        {"200": _json("what was applied and how", "Applied"), **_BAD, "422": _ERROR},
        parameters=[
            _query("base", "string", "absolute directory that relative paths in the specs "
                                     "resolve against (default: the daemon's working directory)"),
            _query("dryRun", "integer", "1: validate and report, write nothing", enum=[0, 1])],
        requestBody={"required": True, "content": {
            "application/yaml": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}}}})},
    "/v1/objects": {"get": _op(
        "Every live object, with its endpoint and status",
        {"200": _json("objects", "Objects")},
        parameters=[_query("kind", "string", "only objects of this kind")])},
    "/v1/objects/{kind}/{name}": {
        "get": _op("One object, its status and its replicas",
                   {"200": _json("the object", "Object"), **_NOT_FOUND},
                   parameters=_KIND_NAME),
        "delete": _op("Delete an object; the reconciler stops and removes its replicas",
                      {"200": _json("deleted", "Deleted"), **_NOT_FOUND},
                      parameters=_KIND_NAME)},
    "/v1/objects/{kind}/{name}/logs": {"get": _op(
        "Every replica's log, each line prefixed by `[replica-id]`",
        {"200": _text("log lines"), **_BAD, **_NOT_FOUND},
        parameters=[*_KIND_NAME, _TAIL, _FOLLOW])},
    "/v1/objects/{kind}/{name}/rollout": {"get": _op(
        "Where the object's latest rollout stands",
        {"200": _json("the rollout", "RolloutStatus"), **_NOT_FOUND},
        parameters=_KIND_NAME)},
    "/v1/objects/{kind}/{name}/rollout/promote": {"post": _op(
        "Give a paused canary the whole service",
        {"200": _json("the rollout", "RolloutStatus"), **_NOT_FOUND, "409": _ERROR},
        parameters=_KIND_NAME)},
    "/v1/objects/{kind}/{name}/rollout/undo": {"post": _op(
        "Apply an earlier revision again (the previous one by default); the reconciler rolls "
        "to it",
        {"200": _json("the object as it now stands", "Object"), **_BAD, **_NOT_FOUND,
         "409": _ERROR},
        parameters=_KIND_NAME,
        requestBody={"required": False, "content": {"application/json": {
            "schema": _obj(toRevision={"type": "integer", "minimum": 1})}}})},
    "/v1/objects/{kind}/{name}/revisions": {"get": _op(
        "The object's revisions, oldest first (the last is the one it runs or rolls to)",
        {"200": _json("revisions", "Revisions"), **_NOT_FOUND},
        parameters=_KIND_NAME)},
    "/v1/replicas": {"get": _op("Every replica the control plane runs",
                                {"200": _json("replicas", "Replicas")})},
    "/v1/replicas/{id}/logs": {"get": _op(
        "One replica's console (VMs) or output (containers, processes)",
        {"200": _text("the log"), **_BAD, **_NOT_FOUND},
        parameters=[_path("id", "replica id or a unique prefix"), _TAIL, _FOLLOW])},
    "/v1/events": {"get": _op(
        "Events, oldest first",
        {"200": _json("events", "Events"), **_BAD},
        parameters=[
            _query("after", "integer", "only events with a larger id (to continue a watch)",
                   default=0, minimum=0),
            _query("limit", "integer", "at most this many", minimum=0),
            _query("tail", "integer", "only the newest N (after the other filters)", minimum=0),
            _query("kind", "string", "only events of objects of this kind"),
            _query("name", "string", "only events of objects with this name")])},
    "/v1/models": {
        "get": _op("Model versions, by name, oldest first",
                   {"200": _json("models", "Models")},
                   parameters=[_query("name", "string", "only this model's versions")]),
        "post": _op(
            "Push a model file as a new version (identical bytes return the existing version)",
            {"201": _json("pushed", "Pushed"), "200": _json("already there", "Pushed"),
             **_BAD, "409": _ERROR, "422": _ERROR},
            parameters=[
                {**_query("name", "string", "the model's name, e.g. iris"), "required": True},
                _query("version", "string", "a number or a label (default: the next number)"),
                _query("format", "string", "the body's format: onnx only (the daemon never "
                                           "loads a pickle; `uniframe model push` converts "
                                           "scikit-learn models on the client)", enum=["onnx"]),
                {**_query("meta", "string", "KEY=VALUE to record, repeatable"),
                 "style": "form", "explode": True}],
            requestBody={"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}})},
    "/v1/models/{name}/{version}": {
        "get": _op("One version: metadata, file path on the daemon's host, and its users",
                   {"200": _json("the version", "ModelDetail"), **_NOT_FOUND},
                   parameters=_MODEL),
        "delete": _op("Remove a version; refused (409) while an applied spec uses it",
                      {"200": _json("removed", "Removed"), **_NOT_FOUND, "409": _ERROR},
                      parameters=_MODEL)},
    "/v1/uploads": {"post": _op(
        "Upload a file a spec names (a model, cloud-init user data, a VM disk, an OCI archive); "
        "the answer's path is what the spec then names",
        {"201": _json("stored", "Upload"), "200": _json("already there", "Upload"), **_BAD,
         "413": _ERROR, "422": _ERROR},
        parameters=[
            {**_query("name", "string", "a plain file name, e.g. model.onnx"), "required": True},
            _query("sha256", "string", "the digest the client computed; a mismatch refuses "
                                       "the upload")],
        requestBody={"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}})},
    "/v1/uploads/{sha256}/{name}": {"get": _op(
        "Whether a file is already uploaded (so a client need not send it again)",
        {"200": _json("stored", "Upload"), **_NOT_FOUND, "422": _ERROR},
        parameters=[_path("sha256"), _path("name")])},
}

_TENSOR = _obj(name=_STR, datatype=_STR, shape={"type": "array", "items": _INT})

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {
        "error": _STR,
        "errors": {"type": "array", "items": _obj(
            document=_nullable(_INT), path=_STR, message=_STR, line=_nullable(_INT),
            column=_nullable(_INT))}}},
    "Applied": _obj(dry_run=_BOOL, applied={"type": "array", "items": _obj(
        kind=_STR, name=_STR, generation=_INT, changed=_BOOL, revision_digest=_STR,
        action={"type": "string", "enum": ["created", "configured", "unchanged"]})}),
    "Endpoint": _nullable(_obj(host=_STR, port=_INT)),
    "Status": _obj(
        replicas=_obj(desired=_nullable(_INT), total=_INT, ready=_INT,
                      states={"type": "object", "additionalProperties": _INT}),
        rollout=_nullable(_ref("RolloutStatus")),
        revision_digest={"type": "string", "description": "the revision the spec asks for"},
        autoscaling=_nullable(_obj(
            min=_INT, max=_INT, metric=_STR, target=_nullable(_NUM), desired=_nullable(_INT),
            ready=_INT, observed=_nullable(_NUM), panicking=_BOOL))),
    "Object": _obj(kind=_STR, name=_STR, generation=_INT, digest=_STR, created_at=_NUM,
                   updated_at=_NUM, deleted=_BOOL, spec={"type": "object"},
                   endpoint=_ref("Endpoint"), status=_ref("Status"),
                   replicas={"type": "array", "items": _ref("Replica"),
                             "description": "only when one object is asked for"}),
    "Objects": _list("objects", "Object"),
    "Deleted": _obj(deleted=_obj(kind=_STR, name=_STR, generation=_INT)),
    "Replica": _obj(
        id=_STR, kind=_STR, name=_STR, driver=_STR, image_digest=_STR,
        state={"type": "string", "enum": list(REPLICA_STATES)},
        desired=_STR, host_port=_nullable(_INT), created_at=_NUM, updated_at=_NUM,
        last_error=_STR, restarts=_INT, next_restart_at=_nullable(_NUM),
        revision={"type": "string", "description": "digest of the revision it runs"}),
    "Replicas": _list("replicas", "Replica"),
    "Event": _obj(id=_INT, time=_NUM, kind=_STR, name=_STR, replica_id=_nullable(_STR),
                  type={"type": "string", "enum": ["Normal", "Warning"]}, reason=_STR,
                  message=_STR),
    "Events": _list("events", "Event"),
    "Model": _obj(name=_STR, version=_STR, sha256=_STR,
                  format={"type": "string", "description": "onnx, or sklearn->onnx"},
                  inputs={"type": "array", "items": _TENSOR},
                  outputs={"type": "array", "items": _TENSOR},
                  size=_INT, created_at=_NUM, metadata={"type": "object"}),
    "Models": _list("models", "Model"),
    "ModelDetail": {"allOf": [_ref("Model"), _obj(
        path=_STR, used_by={"type": "array", "items": _STR})]},
    "RolloutStatus": _obj(
        kind=_STR, name=_STR, strategy={"type": "string", "enum": ["rolling", "canary"]},
        state={"type": "string", "enum": list(ROLLOUT_STATES)},
        revision=_nullable(_INT), from_revision=_nullable(_INT),
        traffic_percent=_nullable(_INT), desired=_INT, updated=_INT, updated_ready=_INT,
        ready=_INT, old=_INT, message=_STR, started_at=_nullable(_NUM),
        updated_at=_nullable(_NUM),
        target_digest={**_nullable(_STR), "description": "the revision digest it rolls to"}),
    "Revision": _obj(kind=_STR, name=_STR, number=_INT, digest=_STR,
                     spec={"type": "object"}, created_at=_NUM),
    "Revisions": _list("revisions", "Revision"),
    "Pushed": _obj(model=_ref("Model"), created=_BOOL),
    "Removed": _obj(removed=_ref("Model")),
    "Upload": _obj(path=_STR, sha256=_STR, size=_INT),
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "uniframe daemon", "version": "1",
             "description": "The control plane: apply specs, read their state, replicas, "
                            "logs and events, manage models and rollouts. Every error is "
                            "JSON `{\"error\": ...}` with a 4xx or 5xx status. Every route "
                            "needs the daemon's bearer token (401 without it)."},
    "paths": PATHS,
    "components": {"schemas": SCHEMAS, "securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "the token in the daemon's state directory (daemon.token)"}}},
    "security": [{"bearer": []}],
}
