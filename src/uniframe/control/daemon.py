"""The daemon: a JSON HTTP API over the state store, and the reconciler in a background thread.

The API only reads and writes the store; everything that starts or stops a
replica happens in the reconciler, so a request never waits on a build or a
boot, and the daemon can be killed at any moment without losing what was
applied. The standard library's threading HTTP server is enough for a
control API (a handful of requests per second); the data path is the
per-service proxy, never this process.

Routes (see :data:`OPENAPI` for the same in OpenAPI 3)::

    POST   /v1/apply                    body: spec documents, YAML or JSON
    GET    /v1/objects                  every live object
    GET    /v1/objects/{kind}/{name}
    DELETE /v1/objects/{kind}/{name}
    GET    /v1/replicas
    GET    /v1/events?after=ID&limit=N
    GET    /openapi.json
    GET    /metrics                     Prometheus text exposition
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from uniframe.control.reconciler import SERVICE_KIND, Reconciler
from uniframe.control.registry import Registry, model_ref_of
from uniframe.control.store import ObjectRecord, Store
from uniframe.errors import ConflictError, NotFoundError, UniframeError
from uniframe.spec.loader import check_text

MAX_BODY = 4 << 20
RUN_KINDS = (SERVICE_KIND,)


class ApiError(Exception):
    """An answer other than 200, with a JSON body."""

    def __init__(self, status: HTTPStatus, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **extra}


def _object_json(obj: ObjectRecord) -> dict[str, Any]:
    return {"kind": obj.kind, "name": obj.name, "generation": obj.generation,
            "digest": obj.digest, "created_at": obj.created_at, "updated_at": obj.updated_at,
            "deleted": obj.deleted, "spec": obj.spec}


class Api:
    """The routes, as plain methods over the store (the HTTP handler only frames them)."""

    def __init__(self, store: Store, reconciler: Reconciler) -> None:
        self.store = store
        self.reconciler = reconciler

    def apply(self, text: str) -> dict[str, Any]:
        report = check_text(text, "<request>")
        errors = [{"document": p.index, "path": p.path, "message": p.message,
                   "line": p.line} for p in report.problems]
        errors += [{"document": d.index, "path": "kind",
                    "message": f"the daemon runs only {', '.join(RUN_KINDS)} so far"}
                   for d in report.documents if d.kind not in RUN_KINDS]
        if errors:
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, "the spec is not valid",
                           errors=errors)
        applied = []
        with self.store.tx() as tx:
            for doc in report.documents:
                spec = doc.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
                pinned = model_ref_of(spec)
                if pinned is not None:
                    try:
                        Registry(self.store).require(tx, *pinned)
                    except NotFoundError as exc:
                        raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc), errors=[
                            {"document": doc.index, "path": "spec.model", "message": str(exc)}]
                        ) from None
                obj, changed = tx.apply_object(doc.kind, doc.name, spec)
                applied.append({"kind": obj.kind, "name": obj.name,
                                "generation": obj.generation, "changed": changed})
        self.reconciler.wake()
        return {"applied": applied}

    def objects(self) -> dict[str, Any]:
        with self.store.tx(readonly=True) as tx:
            return {"objects": [_object_json(o) for o in tx.list_objects()]}

    def object(self, kind: str, name: str) -> dict[str, Any]:
        with self.store.tx(readonly=True) as tx:
            obj = tx.get_object(kind, name)
            if obj is None:
                raise ApiError(HTTPStatus.NOT_FOUND, f"{kind}/{name} does not exist")
            out = _object_json(obj)
            out["replicas"] = [asdict(r) for r in tx.list_replicas(kind, name)]
            return out

    def delete(self, kind: str, name: str) -> dict[str, Any]:
        with self.store.tx() as tx:
            obj = tx.delete_object(kind, name)
        self.reconciler.wake()
        return {"deleted": {"kind": obj.kind, "name": obj.name, "generation": obj.generation}}

    def replicas(self) -> dict[str, Any]:
        with self.store.tx(readonly=True) as tx:
            return {"replicas": [asdict(r) for r in tx.list_replicas()]}

    def events(self, after: int, limit: int | None) -> dict[str, Any]:
        with self.store.tx(readonly=True) as tx:
            return {"events": [asdict(e) for e in tx.events(after_id=after, limit=limit)]}

    def metrics(self) -> str:
        with self.store.tx(readonly=True) as tx:
            objects = tx.list_objects()
            replicas = tx.list_replicas()
        states: dict[str, int] = {}
        for r in replicas:
            states[r.state] = states.get(r.state, 0) + 1
        rec = self.reconciler
        lines = [
            "# HELP uniframe_objects Live applied objects.",
            "# TYPE uniframe_objects gauge",
            f"uniframe_objects {len(objects)}",
            "# HELP uniframe_replicas Replicas recorded in the store, by state.",
            "# TYPE uniframe_replicas gauge",
            *(f'uniframe_replicas{{state="{s}"}} {n}' for s, n in sorted(states.items())),
            "# HELP uniframe_replica_restarts Restarts of the replicas that exist now.",
            "# TYPE uniframe_replica_restarts gauge",
            f"uniframe_replica_restarts {sum(r.restarts for r in replicas)}",
            "# HELP uniframe_reconcile_passes_total Reconcile passes since the daemon started.",
            "# TYPE uniframe_reconcile_passes_total counter",
            f"uniframe_reconcile_passes_total {rec.passes}",
            "# HELP uniframe_reconcile_errors_total Objects whose reconcile failed.",
            "# TYPE uniframe_reconcile_errors_total counter",
            f"uniframe_reconcile_errors_total {rec.errors}",
            "# HELP uniframe_reconcile_last_pass_seconds Duration of the last pass.",
            "# TYPE uniframe_reconcile_last_pass_seconds gauge",
            f"uniframe_reconcile_last_pass_seconds {rec.last_pass_seconds:.6f}",
        ]
        return "\n".join(lines) + "\n"


def _json_response(description: str, schema: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


_ERROR = _json_response("an error; `errors` lists spec problems by field path", "Error")
_KIND_NAME = [{"name": "kind", "in": "path", "required": True, "schema": {"type": "string"}},
              {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "uniframe daemon", "version": "1"},
    "paths": {
        "/v1/apply": {"post": {
            "summary": "Create or update objects from spec documents (YAML or JSON)",
            "requestBody": {"required": True, "content": {
                "application/yaml": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "object"}}}},
            "responses": {"200": _json_response("what was applied", "Applied"),
                          "422": _ERROR}}},
        "/v1/objects": {"get": {"summary": "Every live object",
                                "responses": {"200": _json_response("objects", "Objects")}}},
        "/v1/objects/{kind}/{name}": {
            "get": {"summary": "One object and its replicas", "parameters": _KIND_NAME,
                    "responses": {"200": _json_response("the object", "Object"),
                                  "404": _ERROR}},
            "delete": {"summary": "Delete an object; its replicas are stopped and removed",
                       "parameters": _KIND_NAME,
                       "responses": {"200": _json_response("deleted", "Deleted"),
                                     "404": _ERROR}}},
        "/v1/replicas": {"get": {"summary": "Every replica the control plane runs",
                                 "responses": {"200": _json_response("replicas", "Replicas")}}},
        "/v1/events": {"get": {
            "summary": "Events, oldest first",
            "parameters": [
                {"name": "after", "in": "query", "schema": {"type": "integer", "default": 0}},
                {"name": "limit", "in": "query", "schema": {"type": "integer"}}],
            "responses": {"200": _json_response("events", "Events")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "text exposition", "content": {"text/plain": {}}}}}},
        "/openapi.json": {"get": {"summary": "This document",
                                  "responses": {"200": {"description": "OpenAPI 3"}}}},
    },
    "components": {"schemas": {
        "Error": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object", "properties": {
                "document": {"type": "integer"}, "path": {"type": "string"},
                "message": {"type": "string"}, "line": {"type": "integer", "nullable": True}}}}}},
        "Applied": {"type": "object", "properties": {"applied": {"type": "array", "items": {
            "type": "object", "properties": {
                "kind": {"type": "string"}, "name": {"type": "string"},
                "generation": {"type": "integer"}, "changed": {"type": "boolean"}}}}}},
        "Object": {"type": "object", "properties": {
            "kind": {"type": "string"}, "name": {"type": "string"},
            "generation": {"type": "integer"}, "digest": {"type": "string"},
            "created_at": {"type": "number"}, "updated_at": {"type": "number"},
            "deleted": {"type": "boolean"}, "spec": {"type": "object"},
            "replicas": {"type": "array", "items": {"$ref": "#/components/schemas/Replica"}}}},
        "Objects": {"type": "object", "properties": {"objects": {
            "type": "array", "items": {"$ref": "#/components/schemas/Object"}}}},
        "Deleted": {"type": "object", "properties": {"deleted": {"type": "object"}}},
        "Replica": {"type": "object", "properties": {
            "id": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
            "driver": {"type": "string"}, "image_digest": {"type": "string"},
            "state": {"type": "string",
                      "enum": ["pending", "starting", "ready", "crashed", "crash-loop"]},
            "desired": {"type": "string"}, "host_port": {"type": "integer", "nullable": True},
            "created_at": {"type": "number"}, "updated_at": {"type": "number"},
            "last_error": {"type": "string"}, "restarts": {"type": "integer"},
            "next_restart_at": {"type": "number", "nullable": True}}},
        "Replicas": {"type": "object", "properties": {"replicas": {
            "type": "array", "items": {"$ref": "#/components/schemas/Replica"}}}},
        "Event": {"type": "object", "properties": {
            "id": {"type": "integer"}, "time": {"type": "number"}, "kind": {"type": "string"},
            "name": {"type": "string"}, "replica_id": {"type": "string", "nullable": True},
            "type": {"type": "string", "enum": ["Normal", "Warning"]},
            "reason": {"type": "string"}, "message": {"type": "string"}}},
        "Events": {"type": "object", "properties": {"events": {
            "type": "array", "items": {"$ref": "#/components/schemas/Event"}}}},
    }},
}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
        api = self.server.api
        try:
            if method == "GET" and parts == ["metrics"]:
                self._send(200, api.metrics().encode(), "text/plain; version=0.0.4")
                return
            result: dict[str, Any]
            if method == "GET" and parts == ["openapi.json"]:
                result = OPENAPI
            elif method == "POST" and parts == ["v1", "apply"]:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"the body is over {MAX_BODY} bytes")
                raw = self.rfile.read(length)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ApiError(HTTPStatus.BAD_REQUEST, "the body is not UTF-8 text") from None
                result = api.apply(text)
            elif method == "GET" and parts == ["v1", "objects"]:
                result = api.objects()
            elif method == "GET" and len(parts) == 4 and parts[:2] == ["v1", "objects"]:
                result = api.object(parts[2], parts[3])
            elif method == "DELETE" and len(parts) == 4 and parts[:2] == ["v1", "objects"]:
                result = api.delete(parts[2], parts[3])
            elif method == "GET" and parts == ["v1", "replicas"]:
                result = api.replicas()
            elif method == "GET" and parts == ["v1", "events"]:
                query = parse_qs(url.query)
                try:
                    after = int(query.get("after", ["0"])[0])
                    limit = int(query["limit"][0]) if "limit" in query else None
                except ValueError:
                    raise ApiError(HTTPStatus.BAD_REQUEST,
                                   "after and limit are integers") from None
                result = api.events(after, limit)
            else:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no route {method} {url.path}; "
                               "see /openapi.json")
            self._send(200, json.dumps(result).encode(), "application/json")
        except ApiError as exc:
            self._send(exc.status, json.dumps(exc.body).encode(), "application/json")
        except NotFoundError as exc:
            self._send(404, json.dumps({"error": str(exc)}).encode(), "application/json")
        except ConflictError as exc:
            self._send(409, json.dumps({"error": str(exc)}).encode(), "application/json")
        except UniframeError as exc:
            self._send(500, json.dumps({"error": str(exc)}).encode(), "application/json")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: Api) -> None:
        self.api = api
        super().__init__(address, _Handler)


class Daemon:
    """The API server and the reconciler thread, started and stopped together."""

    def __init__(self, store: Store, reconciler: Reconciler, host: str, port: int, *,
                 period: float = 1.0) -> None:
        self.store = store
        self.reconciler = reconciler
        self.server = _Server((host, port), Api(store, reconciler))
        self._thread = threading.Thread(target=reconciler.run, args=(period,),
                                        name="reconciler", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`; the replicas keep running after the daemon stops."""
        self._thread.start()
        try:
            self.server.serve_forever(poll_interval=0.2)
        finally:
            self.reconciler.stop()
            self._thread.join(timeout=30)
            self.server.server_close()

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.server.shutdown()
