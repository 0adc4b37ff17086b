"""The route table: method and path template -> a function of the :class:`Api`.

One table serves two readers: the daemon's handler matches requests against
it, and a test checks it against the OpenAPI document path by path, so the
published document cannot drift from what the daemon answers. Query values
are parsed here and a bad one is a 400 naming the parameter, before any
route runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from uniframe.control.api.methods import Api, ApiError
from uniframe.control.api.openapi import OPENAPI

BodyKind = Literal["none", "text", "file"]

MAX_INTEGER = (1 << 63) - 1
"""The largest integer the stores keep (a signed 64-bit column): beyond it SQLite overflows."""


@dataclass(frozen=True)
class Request:
    """What a route sees: path parameters, query values, and the body as text or a file."""

    params: dict[str, str]
    query: dict[str, list[str]]
    text: str = ""
    file: Path | None = None

    def one(self, key: str) -> str | None:
        values = self.query.get(key)
        return values[-1] if values else None

    def integer(self, key: str, *, minimum: int = 0, maximum: int = MAX_INTEGER) -> int | None:
        value = self.one(key)
        if value is None or value == "":
            return None
        try:
            number = int(value) if len(value) <= 20 else minimum - 1
        except ValueError:
            number = minimum - 1
        if not minimum <= number <= maximum:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"query parameter {key}={value!r}: give a "
                           f"whole number from {minimum} to {maximum}")
        return number

    def flag(self, key: str) -> bool:
        value = self.one(key)
        if value is None:
            return False
        if value.lower() in ("1", "true", "yes", ""):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ApiError(HTTPStatus.BAD_REQUEST, f"query parameter {key}={value!r}: give 1 or 0")

    def required(self, key: str) -> str:
        value = self.one(key)
        if not value:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"query parameter {key} is required")
        return value


@dataclass(frozen=True)
class Reply:
    """A route's answer: JSON, plain text, or a stream of byte chunks (sent chunked)."""

    body: dict[str, Any] | str | Iterator[bytes]
    status: HTTPStatus = HTTPStatus.OK
    content_type: str = "application/json"


Handler = Callable[[Api, Request], Reply | dict[str, Any]]


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    handler: Handler
    body: BodyKind = "none"
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.template))
        object.__setattr__(self, "pattern", re.compile(f"^{regex}$"))

    def match(self, path: str) -> dict[str, str] | None:
        found = self.pattern.match(path)
        return {k: unquote(v) for k, v in found.groupdict().items()} if found else None


# -- the handlers ------------------------------------------------------------------------------


def _apply(api: Api, req: Request) -> dict[str, Any]:
    base = req.one("base")
    if base is not None and not Path(base).is_absolute():
        raise ApiError(HTTPStatus.BAD_REQUEST,
                       f"query parameter base={base!r}: give an absolute directory")
    return api.apply(req.text, Path(base) if base else None, dry_run=req.flag("dryRun"))


def _logs(stream: Iterator[bytes]) -> Reply:
    return Reply(stream, content_type="text/plain; charset=utf-8")


def _metadata(req: Request) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for pair in req.query.get("meta", []):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           f"query parameter meta={pair!r}: write KEY=VALUE, e.g. meta=owner=ml")
        meta[key] = value
    return meta


def _push_model(api: Api, req: Request) -> Reply:
    fmt = req.one("format") or "onnx"
    if fmt != "onnx":
        raise ApiError(HTTPStatus.BAD_REQUEST,
                       f"query parameter format={fmt!r}: the daemon takes ONNX models only (it "
                       "never loads a pickle: that would run the file's code as root); "
                       "`uniframe model push MODEL.pkl` converts a scikit-learn model on your side")
    assert req.file is not None
    named = req.file.with_name("model.onnx")
    req.file.rename(named)  # the registry tells formats by suffix
    body, created = api.push_model(named, req.required("name"), req.one("version") or None,
                                   _metadata(req))
    return Reply(body, HTTPStatus.CREATED if created else HTTPStatus.OK)


def _add_upload(api: Api, req: Request) -> Reply:
    assert req.file is not None
    body, created = api.add_upload(req.file, req.required("name"), req.one("sha256") or None)
    return Reply(body, HTTPStatus.CREATED if created else HTTPStatus.OK)


def _undo(api: Api, req: Request) -> dict[str, Any]:
    to_revision = None
    if req.text.strip():
        try:
            body = json.loads(req.text)
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, 'the body is not JSON; send {"toRevision": N} '
                           "or nothing") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, 'send {"toRevision": N} or nothing')
        value = body.get("toRevision")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           f"toRevision {value!r}: give a revision number (see the revisions)")
        to_revision = value
    return api.undo(req.params["kind"], req.params["name"], to_revision)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/openapi.json", lambda api, req: OPENAPI),
    Route("GET", "/metrics",
          lambda api, req: Reply(api.metrics(), content_type="text/plain; version=0.0.4")),
    Route("POST", "/v1/apply", _apply, body="text"),
    Route("GET", "/v1/objects", lambda api, req: api.objects(req.one("kind") or None)),
    Route("GET", "/v1/objects/{kind}/{name}",
          lambda api, req: api.object(req.params["kind"], req.params["name"])),
    Route("DELETE", "/v1/objects/{kind}/{name}",
          lambda api, req: api.delete(req.params["kind"], req.params["name"])),
    Route("GET", "/v1/objects/{kind}/{name}/logs",
          lambda api, req: _logs(api.object_logs(req.params["kind"], req.params["name"],
                                                 req.integer("tail"), req.flag("follow")))),
    Route("GET", "/v1/objects/{kind}/{name}/rollout",
          lambda api, req: api.rollout(req.params["kind"], req.params["name"])),
    Route("POST", "/v1/objects/{kind}/{name}/rollout/promote",
          lambda api, req: api.promote(req.params["kind"], req.params["name"])),
    Route("POST", "/v1/objects/{kind}/{name}/rollout/undo", _undo, body="text"),
    Route("GET", "/v1/objects/{kind}/{name}/revisions",
          lambda api, req: api.revisions(req.params["kind"], req.params["name"])),
    Route("GET", "/v1/replicas", lambda api, req: api.replicas()),
    Route("GET", "/v1/replicas/{id}/logs",
          lambda api, req: _logs(api.replica_logs(req.params["id"], req.integer("tail"),
                                                  req.flag("follow")))),
    Route("GET", "/v1/events",
          lambda api, req: api.events(req.integer("after") or 0, req.integer("limit"),
                                      kind=req.one("kind") or None,
                                      name=req.one("name") or None, tail=req.integer("tail"))),
    Route("GET", "/v1/models", lambda api, req: api.models(req.one("name") or None)),
    Route("POST", "/v1/models", _push_model, body="file"),
    Route("GET", "/v1/models/{name}/{version}",
          lambda api, req: api.model(req.params["name"], req.params["version"])),
    Route("DELETE", "/v1/models/{name}/{version}",
          lambda api, req: api.remove_model(req.params["name"], req.params["version"])),
    Route("POST", "/v1/uploads", _add_upload, body="file"),
    Route("GET", "/v1/uploads/{sha256}/{name}",
          lambda api, req: api.upload(req.params["sha256"], req.params["name"])),
)


def find_route(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route for a request, or a 404/405 that points at the document."""
    allowed = []
    for route in ROUTES:
        params = route.match(path)
        if params is None:
            continue
        if route.method == method:
            return route, params
        allowed.append(route.method)
    if allowed:
        raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED,
                       f"{method} {path} is not allowed; use {', '.join(allowed)}",
                       allowed=allowed)
    raise ApiError(HTTPStatus.NOT_FOUND, f"no route {method} {path}; see /openapi.json")
