"""Who gets into the root daemon, and what it will read: every door tried from outside.

A real daemon serves real HTTP (unix socket and loopback TCP) and each probe
is what an unprivileged local user or a web page could send: no token, a
wrong one, a hostile ``Host`` or ``Origin``, a pickle that runs a command,
specs that name ``/etc/shadow``, a qcow2 whose backing file is a root-only
file. A marker file proves the pickle's payload never ran.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from control_helpers import SERVICE, kill_strays, service_yaml
from typer.testing import CliRunner

import uniframe.cli.main  # noqa: F401  (registers every command)
from uniframe.build.examples import write_iris
from uniframe.cli.app import app
from uniframe.control.api.routes import ROUTES
from uniframe.control.api.server import Daemon, DaemonConfig
from uniframe.control.reconciler import Reconciler
from uniframe.control.store import Store


class _Payload:
    """Unpickling this runs ``touch MARKER``: the proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("UNIFRAME_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("UNIFRAME_STATE", str(tmp_path / "st"))
    monkeypatch.delenv("UNIFRAME_TOKEN", raising=False)
    monkeypatch.delenv("UNIFRAME_DAEMON", raising=False)
    return tmp_path


@contextlib.contextmanager
def serving(config: DaemonConfig, root: Path) -> Iterator[Daemon]:
    store = Store.open(str(root / "state.db"))
    daemon = Daemon(store, Reconciler(store), config, period=0.2)
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    try:
        yield daemon
    finally:
        try:  # what the test applied goes, replicas and endpoints with it
            with store.tx() as tx:
                for obj in tx.list_objects():
                    tx.delete_object(obj.kind, obj.name)
            daemon.reconciler.wake()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with store.tx(readonly=True) as tx:
                    if not tx.list_objects(include_deleted=True):
                        break
                time.sleep(0.1)
        finally:
            daemon.shutdown()
            thread.join(30)
            store.close()
            kill_strays(root)  # whatever a failed test left running under its directory


@pytest.fixture
def daemon(home: Path) -> Iterator[Daemon]:
    """The default daemon (its unix socket, its token file) plus loopback TCP; no allowed paths."""
    with serving(DaemonConfig(listen=("127.0.0.1", 0)), home) as d:
        yield d


def bearer(d: Daemon) -> dict[str, str]:
    return {"Authorization": f"Bearer {d.token}"}


def concrete(template: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: {"kind": SERVICE}.get(m.group(1), "x"), template)


def test_every_route_answers_401_without_the_credential(daemon: Daemon) -> None:
    wrong = [{}, {"Authorization": "Bearer " + "A" * 43}, {"Authorization": f"Basic {daemon.token}"},
             {"Cookie": f"token={daemon.token}"}]
    with httpx.Client(base_url=daemon.url, timeout=10) as http:
        for route in ROUTES:
            for headers in wrong:
                reply = http.request(route.method, concrete(route.template), headers=headers,
                                     params={"token": daemon.token}, content=b"x")
                assert reply.status_code == 401, (route.template, headers, reply.text)
                assert reply.headers["content-type"] == "application/json"
                assert reply.headers["www-authenticate"].startswith("Bearer")
                assert "needs the daemon's token" in reply.json()["error"]
                assert daemon.token not in reply.text
        # unknown paths and methods too: nothing is reachable before the credential
        assert http.get("/nope").status_code == 401
        assert http.request("TRACE", "/v1/objects").status_code == 401
        assert http.get("/openapi.json", headers=bearer(daemon)).status_code == 200


def test_the_unix_socket_and_the_token_are_private(daemon: Daemon, home: Path) -> None:
    sock = home / "st" / "daemon.sock"
    token = home / "st" / "daemon.token"
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) & 0o077 == 0
    assert stat.S_IMODE(os.stat(token).st_mode) == 0o600
    assert token.read_text().strip() == daemon.token and len(daemon.token) >= 32
    transport = httpx.HTTPTransport(uds=str(sock))
    with httpx.Client(base_url="http://uniframe", transport=transport, timeout=10) as http:
        assert http.get("/v1/objects").status_code == 401
        assert http.get("/v1/objects", headers=bearer(daemon)).json() == {"objects": []}


def test_a_web_page_cannot_drive_the_api(daemon: Daemon, tmp_path: Path) -> None:
    """DNS rebinding (Host: evil.example) and a cross-site form post (text/plain, Origin)."""
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Payload(marker))
    port = daemon.address[1]
    with httpx.Client(base_url=daemon.url, timeout=10) as http:
        for headers in ({"Host": f"evil.example:{port}"}, {"Origin": "http://evil.example"},
                        {"Host": f"evil.example:{port}", "Origin": "http://evil.example"}):
            reply = http.post("/v1/models", params={"name": "x", "format": "sklearn"},
                              content=blob, headers={**headers, **bearer(daemon),
                                                     "Content-Type": "text/plain"})
            assert reply.status_code == 403, (headers, reply.text)
            assert reply.headers["content-type"] == "application/json"
        assert http.get("/v1/objects", headers={"Host": f"localhost:{port}",
                                                **bearer(daemon)}).status_code == 200
    assert not marker.exists()


def test_pickles_are_refused_without_being_loaded(daemon: Daemon, home: Path) -> None:
    marker = home / "pwned"
    allowed = home / "data" / "uploads"  # the one root this daemon reads from
    blob = pickle.dumps(_Payload(marker))
    with httpx.Client(base_url=daemon.url, timeout=30, headers=bearer(daemon)) as http:
        reply = http.post("/v1/models", params={"name": "x", "format": "sklearn"}, content=blob)
        assert reply.status_code == 400 and "never loads a pickle" in reply.json()["error"]
        reply = http.post("/v1/models", params={"name": "x"}, content=blob)  # sent as "onnx"
        assert reply.status_code == 422 and "not an ONNX model" in reply.json()["error"]
        # a spec naming a pickle the daemon itself holds (an upload): still never loaded
        up = http.post("/v1/uploads", params={"name": "model.pkl"}, content=blob)
        assert up.status_code == 201, up.text
        path = up.json()["path"]
        assert Path(path).is_relative_to(allowed)
        for model in (f"{{uri: {path}}}", f"{{uri: {path}, format: sklearn}}"):
            reply = http.post("/v1/apply", content=service_yaml(model))
            assert reply.status_code == 422, reply.text
            assert [e["path"] for e in reply.json()["errors"]] == ["spec.model.format"]
    assert not marker.exists()


def _problems(http: httpx.Client, text: str, **params: str) -> list[tuple[str, str]]:
    reply = http.post("/v1/apply", content=text, params=params)
    assert reply.status_code == 422, reply.text
    return [(e["path"], e["message"]) for e in reply.json()["errors"]]


def test_specs_cannot_name_host_files_outside_the_allowed_roots(daemon: Daemon,
                                                                  home: Path) -> None:
    link = home / "data" / "uploads" / "innocent.onnx"
    link.parent.mkdir(parents=True)
    link.symlink_to("/etc/shadow")
    workload = ("apiVersion: uniframe.dev/v1alpha1\nkind: Workload\nmetadata: {name: w}\n"
                "spec:\n  image: {image}\n  runtime: {runtime}\n{extra}")
    cases = [
        (service_yaml("{uri: /etc/shadow, format: onnx}"), {}, "spec.model.uri"),
        (service_yaml("{uri: ./shadow, format: onnx}"), {"base": "/etc"}, "spec.model.uri"),
        (service_yaml(f"{{uri: {link}}}"), {}, "spec.model.uri"),  # symlinks are followed
        (service_yaml("iris@1", extra="  kernel: /boot/vmlinuz\n").replace(
            "runtime: process", "runtime: unikernel"), {}, "spec.kernel"),
        (workload.replace("{image}", "./disk.qcow2").replace("{runtime}", "vm").replace(
            "{extra}", "  cloudInit: {userDataFile: /etc/shadow}\n"), {"base": str(home)},
         "spec.cloudInit.userDataFile"),
        (workload.replace("{image}", "/").replace("{runtime}", "container").replace(
            "{extra}", "  command: [/bin/sh, -c, id]\n"), {}, "spec.image"),
    ]
    with httpx.Client(base_url=daemon.url, timeout=30, headers=bearer(daemon)) as http:
        for text, params, field in cases:
            problems = _problems(http, text, **params)
            assert field in [p for p, _ in problems], (field, problems)
            message = dict(problems)[field]
            assert "not under a directory the daemon may read from" in message
            assert "--allow-path" in message
    with httpx.Client(base_url=daemon.url, timeout=30, headers=bearer(daemon)) as http:
        assert http.get("/v1/objects").json() == {"objects": []}  # nothing was applied


def test_a_qcow2_whose_backing_file_is_root_only_is_refused(home: Path) -> None:
    disks = home / "disks"
    disks.mkdir()
    secret = home / "secret.raw"
    secret.write_bytes(b"\0" * 1024 * 1024)
    secret.chmod(0o600)
    top = disks / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret),
                    str(top)], check=True)
    spec = ("apiVersion: uniframe.dev/v1alpha1\nkind: Workload\nmetadata: {name: w}\n"
            f"spec:\n  image: {top}\n  runtime: vm\n")
    with serving(DaemonConfig(listen=("127.0.0.1", 0), allow_paths=(disks,)), home) as d, \
            httpx.Client(base_url=d.url, timeout=30, headers=bearer(d)) as http:
        problems = dict(_problems(http, spec))
    assert "refers to a backing file" in problems["spec.image"]
    assert str(secret) in problems["spec.image"]


def test_the_cli_uploads_what_a_spec_names_and_converts_pickles_itself(daemon: Daemon,
                                                                       home: Path) -> None:
    """The user's CLI works unchanged against a daemon that allows no host path at all."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    work = home / "work"
    write_iris(work)
    x, y = load_iris(return_X_y=True)
    (work / "iris.pkl").write_bytes(pickle.dumps(LogisticRegression(max_iter=300).fit(x, y)))
    (work / "onnx.yaml").write_text(service_yaml("{uri: ./iris.onnx}", name="a"))
    (work / "pkl.yaml").write_text(service_yaml("{uri: ./iris.pkl}", name="b"))
    os.environ["UNIFRAME_DAEMON"] = f"unix://{home / 'st' / 'daemon.sock'}"
    try:
        result = CliRunner().invoke(app, ["apply", "-f", str(work / "onnx.yaml"), "-f",
                                          str(work / "pkl.yaml")], catch_exceptions=False)
    finally:
        os.environ.pop("UNIFRAME_DAEMON")
    assert result.exit_code == 0, result.output
    with httpx.Client(base_url=daemon.url, timeout=30, headers=bearer(daemon)) as http:
        specs = {o["name"]: o["spec"]["spec"]["model"]
                 for o in http.get("/v1/objects").json()["objects"]}
    uploads = home / "data" / "uploads"
    assert set(specs) == {"a", "b"}
    for model in specs.values():
        assert model["format"] == "onnx" and Path(model["uri"]).is_relative_to(uploads)
        assert Path(model["uri"]).read_bytes()[:2] != b"\x80\x04"  # ONNX, not a pickle


def test_tcp_off_loopback_needs_tls_or_an_explicit_insecure_flag(home: Path) -> None:
    from uniframe.errors import CredentialError

    with pytest.raises(CredentialError, match="needs TLS"):
        DaemonConfig(socket=None, listen=("0.0.0.0", 0)).check()
    DaemonConfig(socket=None, listen=("0.0.0.0", 0), insecure_no_tls=True).check()
    DaemonConfig(socket=None, listen=("127.0.0.1", 0)).check()


def test_tls_listener_serves_the_api_to_a_client_that_trusts_its_certificate(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = home / "cert.pem", home / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    config = DaemonConfig(socket=None, listen=("0.0.0.0", 0), tls_cert=cert, tls_key=key)
    with serving(config, home) as d:
        url = f"https://127.0.0.1:{d.address[1]}"
        with pytest.raises(httpx.ConnectError):  # an untrusted certificate is not accepted
            httpx.get(url + "/v1/objects", headers=bearer(d), timeout=10)
        monkeypatch.setenv("UNIFRAME_CA", str(cert))
        from uniframe.control.api.client import DaemonClient

        with DaemonClient(url) as client:  # the token from the daemon's file, the CA from env
            assert client.objects() == []
        # plain HTTP on the TLS port gets nowhere
        with socket.create_connection(("127.0.0.1", d.address[1]), timeout=10) as raw:
            raw.sendall(b"GET /v1/objects HTTP/1.1\r\nHost: localhost\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert b"200 OK" not in raw.recv(4096)


def test_a_pickle_already_in_the_store_is_never_built(daemon: Daemon, home: Path) -> None:
    """A spec that reached the store some other way (an older daemon) is refused at every pass."""
    from control_helpers import until

    marker = home / "pwned"
    pkl = home / "data" / "uploads" / "model.pkl"
    pkl.parent.mkdir(parents=True)
    pkl.write_bytes(pickle.dumps(_Payload(marker)))
    spec = {"apiVersion": "uniframe.dev/v1alpha1", "kind": SERVICE, "metadata": {"name": "old"},
            "spec": {"model": {"uri": str(pkl), "format": "sklearn"}, "runtime": "process"}}
    with daemon.store.tx() as tx:
        tx.apply_object(SERVICE, "old", spec)
    daemon.reconciler.wake()

    def refused() -> bool:
        with daemon.store.tx(readonly=True) as tx:
            return any(e.reason == "ReconcileFailed" and "spec.model.format" in e.message
                       for e in tx.events(SERVICE, "old"))

    until("the reconciler refuses the pickle", refused, 30)
    with daemon.store.tx(readonly=True) as tx:
        assert tx.list_replicas(SERVICE, "old") == []
    assert not marker.exists()
