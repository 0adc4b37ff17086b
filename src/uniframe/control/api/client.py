"""A typed client of the daemon's API: what the CLI (and any script) talks to.

Every method is one request; answers come back as the API's JSON, and
failures as the platform's own errors, so callers handle a missing object or
a refused removal the same way whether the daemon or the store said it::

    UniframeError
    ├── DaemonUnavailableError  nobody listens at the URL, or it did not answer in time
    ├── CredentialError         401/403: no token, a wrong one, or a refused Host
    ├── NotFoundError           404
    ├── ConflictError           409 (e.g. a model version still in use)
    ├── SpecRejectedError       422 from /v1/apply: ``.problems`` keeps every field path
    ├── ModelError              422 from /v1/models (the file is not a model)
    └── DaemonError             any other error status (``.status``, ``.body``)

The address comes from ``--daemon``, else ``$UNIFRAME_DAEMON``, else the
daemon's unix socket in the state directory (``unix:///PATH``; ``http://``
and ``https://`` URLs reach a TCP listener). The bearer token comes from
``$UNIFRAME_TOKEN``, else the file ``$UNIFRAME_TOKEN_FILE``, else the
daemon's own token file (readable by the daemon's user); ``$UNIFRAME_CA``
names a CA bundle for a daemon with a self-signed certificate.
``transport`` is httpx's seam for tests that want no server at all.

:meth:`DaemonClient.apply` uploads the files a spec names and sends the spec
naming the uploads (:mod:`uniframe.control.api.client_uploads`): the daemon reads
no path a client chose.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from uniframe.control.api.auth import client_token, default_socket
from uniframe.control.api.uploads import file_sha256
from uniframe.errors import (
    ConflictError,
    CredentialError,
    ModelError,
    NotFoundError,
    SpecError,
    UniframeError,
)

DAEMON_ENV = "UNIFRAME_DAEMON"
CA_ENV = "UNIFRAME_CA"
JSON = dict[str, Any]
_UNIX_HOST = "http://uniframe"
"""The URL httpx is given for a unix socket: the host is only what the Host header says."""


def default_url() -> str:
    """``$UNIFRAME_DAEMON``, else the daemon's unix socket under the state directory."""
    return os.environ.get(DAEMON_ENV) or f"unix://{default_socket()}"


def _unix_path(url: str) -> str | None:
    if not url.startswith("unix:"):
        return None
    return "/" + url.removeprefix("unix:").lstrip("/")


class DaemonUnavailableError(UniframeError):
    """No daemon answers at the base URL."""


class DaemonError(UniframeError):
    """The daemon answered with an error status this client has no closer class for."""

    def __init__(self, message: str, status: int, body: JSON) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class SpecProblem:
    """One problem the daemon found in a spec, by document and field path."""

    source: str
    document: int | None
    path: str
    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.source
        if self.document is not None:
            where += f", document {self.document}"
        if self.line is not None:
            where += f", line {self.line}" + (f", column {self.column}" if self.column else "")
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecRejectedError(SpecError):
    """``/v1/apply`` refused a spec; the message holds one line per problem."""

    def __init__(self, problems: list[SpecProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def _segment(value: str) -> str:
    return quote(value, safe="")


class DaemonClient:
    """One daemon, over HTTP; use as a context manager or call :meth:`close`."""

    def __init__(self, base_url: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, token: str | None = None,
                 ca_file: str | None = None) -> None:
        self.base_url = (base_url or default_url()).rstrip("/")
        token = token if token is not None else client_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        socket_path = _unix_path(self.base_url)
        http_url = self.base_url
        if socket_path is not None:
            http_url = _UNIX_HOST
            transport = transport or httpx.HTTPTransport(uds=socket_path)
        ca_file = ca_file or os.environ.get(CA_ENV)
        verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=ca_file) if ca_file
                                         else True)
        self._http = httpx.Client(base_url=http_url, timeout=timeout, transport=transport,
                                  headers=headers, verify=verify)
        self._uploaded: dict[tuple[str, str], str] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------

    def _unavailable(self, exc: httpx.TransportError) -> DaemonUnavailableError:
        if isinstance(exc, httpx.TimeoutException):
            return DaemonUnavailableError(f"the uniframe daemon at {self.base_url} did not answer "
                                          "in time; is it overloaded or stuck? see its log")
        return DaemonUnavailableError(f"no uniframe daemon at {self.base_url}: start one with "
                                      "`uniframe daemon` (or point --daemon / $UNIFRAME_DAEMON "
                                      "at the one you run)")

    def _error(self, response: httpx.Response, source: str) -> UniframeError:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        message = str(body.get("error") or f"{response.status_code} {response.reason_phrase}")
        status = response.status_code
        if status in (401, 403):
            return CredentialError(f"the daemon at {self.base_url} refused the request: {message}")
        if status == 404:
            return NotFoundError(message)
        if status == 409:
            return ConflictError(message)
        if status == 422 and isinstance(body.get("errors"), list):
            return SpecRejectedError([
                SpecProblem(source, e.get("document"), str(e.get("path") or ""),
                            str(e.get("message") or ""), e.get("line"), e.get("column"))
                for e in body["errors"] if isinstance(e, dict)])
        if status == 422:
            return ModelError(message)
        return DaemonError(f"the daemon refused {response.request.method} "
                           f"{response.request.url.path}: {message}", status, body)

    def _request(self, method: str, path: str, *, source: str = "<request>",
                 **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from None
        if response.is_error:
            raise self._error(response, source)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> JSON:
        body = self._request(method, path, **kwargs).json()
        if not isinstance(body, dict):
            raise DaemonError(f"{path}: the daemon answered {type(body).__name__}, not an object",
                              200, {})
        return body

    def _stream(self, path: str, params: dict[str, Any]) -> Iterator[bytes]:
        try:
            with self._http.stream("GET", path, params=params,
                                   timeout=httpx.Timeout(10.0, read=None)) as response:
                if response.is_error:
                    response.read()
                    raise self._error(response, path)
                yield from response.iter_raw()
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from None

    # -- objects -----------------------------------------------------------------------------

    def apply(self, text: str, *, source: str = "<request>", base: Path | None = None,
              dry_run: bool = False, upload: bool = True) -> JSON:
        """Apply spec documents; ``source`` names them in errors, ``base`` resolves their paths.

        With ``upload`` the files the specs name are uploaded first and the
        specs sent naming the uploads (scikit-learn pickles converted to ONNX
        here, in the caller's process); without it the paths go as written
        and must lie under a directory the daemon allows.
        """
        if upload:
            from uniframe.control.api.client_uploads import upload_spec_files

            text = upload_spec_files(self, text, source, base)
        params: dict[str, Any] = {"dryRun": int(dry_run)}
        if base is not None:
            params["base"] = str(base.resolve())
        return self._json("POST", "/v1/apply", content=text.encode(), params=params,
                          headers={"Content-Type": "application/yaml"}, source=source)

    def objects(self, kind: str | None = None) -> list[JSON]:
        params = {"kind": kind} if kind else {}
        return list(self._json("GET", "/v1/objects", params=params)["objects"])

    def object(self, kind: str, name: str) -> JSON:
        """One object with its status and replicas."""
        return self._json("GET", self._object_path(kind, name))

    def delete(self, kind: str, name: str) -> JSON:
        return self._json("DELETE", self._object_path(kind, name))

    # -- rollouts ----------------------------------------------------------------------------

    def _object_path(self, kind: str, name: str) -> str:
        return f"/v1/objects/{_segment(kind)}/{_segment(name)}"

    def rollout(self, kind: str, name: str) -> JSON:
        return self._json("GET", self._object_path(kind, name) + "/rollout")

    def promote(self, kind: str, name: str) -> JSON:
        return self._json("POST", self._object_path(kind, name) + "/rollout/promote")

    def undo(self, kind: str, name: str, to_revision: int | None = None) -> JSON:
        """Apply an earlier revision again; the answer is the object as it now stands."""
        body = {"toRevision": to_revision} if to_revision is not None else {}
        return self._json("POST", self._object_path(kind, name) + "/rollout/undo", json=body)

    def revisions(self, kind: str, name: str) -> list[JSON]:
        return list(self._json("GET", self._object_path(kind, name) + "/revisions")["revisions"])

    # -- replicas, logs, events ------------------------------------------------------------

    def replicas(self) -> list[JSON]:
        return list(self._json("GET", "/v1/replicas")["replicas"])

    def replica_logs(self, replica: str, *, tail: int | None = None,
                     follow: bool = False) -> Iterator[bytes]:
        params = {k: v for k, v in (("tail", tail), ("follow", int(follow))) if v is not None}
        return self._stream(f"/v1/replicas/{_segment(replica)}/logs", params)

    def object_logs(self, kind: str, name: str, *, tail: int | None = None,
                    follow: bool = False) -> Iterator[bytes]:
        params = {k: v for k, v in (("tail", tail), ("follow", int(follow))) if v is not None}
        return self._stream(self._object_path(kind, name) + "/logs", params)

    def events(self, *, kind: str | None = None, name: str | None = None, after: int = 0,
               limit: int | None = None, tail: int | None = None) -> list[JSON]:
        params = {k: v for k, v in (("kind", kind), ("name", name), ("after", after),
                                     ("limit", limit), ("tail", tail)) if v is not None}
        return list(self._json("GET", "/v1/events", params=params)["events"])

    # -- models ------------------------------------------------------------------------------

    def models(self, name: str | None = None) -> list[JSON]:
        params = {"name": name} if name else {}
        return list(self._json("GET", "/v1/models", params=params)["models"])

    def model(self, name: str, version: str) -> JSON:
        return self._json("GET", f"/v1/models/{_segment(name)}/{_segment(version)}")

    def push_model(self, file: Path, name: str, *, version: str | None = None,
                   format: str = "onnx", metadata: dict[str, str] | None = None) -> JSON:
        """Upload a model file; the answer is ``{"model": {...}, "created": bool}``."""
        params: list[tuple[str, str]] = [("name", name), ("format", format)]
        if version is not None:
            params.append(("version", version))
        params += [("meta", f"{k}={v}") for k, v in (metadata or {}).items()]
        try:
            fh = file.open("rb")
        except OSError as exc:
            raise ModelError(f"{file}: cannot read the model file ({exc.strerror})") from None
        with fh:
            return self._json("POST", "/v1/models", params=params, content=fh,
                              headers={"Content-Type": "application/octet-stream",
                                       "Content-Length": str(file.stat().st_size)},
                              timeout=httpx.Timeout(30.0, read=600.0))

    def upload(self, file: Path, name: str | None = None) -> str:
        """Upload ``file`` (unless the daemon has these bytes already); its path on the daemon."""
        name = name or _upload_name(file.name)
        try:
            sha256 = file_sha256(file)
        except OSError as exc:
            raise SpecError(f"{file}: cannot read it to upload ({exc.strerror})") from None
        known = self._uploaded.get((sha256, name))
        if known is not None:
            return known
        try:
            path = str(self._json("GET", f"/v1/uploads/{sha256}/{_segment(name)}")["path"])
        except NotFoundError:
            with file.open("rb") as fh:
                path = str(self._json(
                    "POST", "/v1/uploads", params={"name": name, "sha256": sha256}, content=fh,
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Length": str(file.stat().st_size)},
                    timeout=httpx.Timeout(30.0, read=3600.0))["path"])
        self._uploaded[(sha256, name)] = path
        return path

    def remove_model(self, name: str, version: str) -> JSON:
        return self._json("DELETE", f"/v1/models/{_segment(name)}/{_segment(version)}")

    # -- the daemon itself -----------------------------------------------------------------

    def openapi(self) -> JSON:
        return self._json("GET", "/openapi.json")

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text


def _upload_name(name: str) -> str:
    """A file name the daemon accepts: letters, digits, '.', '_' and '-' (the suffix kept)."""
    cleaned = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "_" for c in name).lstrip("._-")
    return (cleaned or "file")[-128:].lstrip("._-") or "file"
