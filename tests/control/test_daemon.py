"""``uniframe daemon`` end to end: a real daemon process, real model servers, real HTTP.

The test plays an operator: applies a spec over the API, checks the replicas
answer inference, kills things with SIGKILL and watches the control plane put
them back, and counts the model-server processes on the host itself so a
duplicate could not hide behind the store's own bookkeeping.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from control_helpers import kill_strays, until

from uniframe.build.examples import write_iris
from uniframe.runtime.verify import free_port

IRIS_ROW = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                        "data": [5.1, 3.5, 1.4, 0.2]}]}


@dataclass
class Env:
    root: Path
    env: dict[str, str]
    store: Path
    model: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        """The token the daemon made in its state directory at its first start."""
        return (Path(self.env["UNIFRAME_STATE"]) / "daemon.token").read_text().strip()


def call(env: Env, method: str, path: str, body: bytes | None = None,
         content_type: str = "application/yaml") -> tuple[int, Any]:
    req = urllib.request.Request(env.url + path, body,
                                 {"Content-Type": content_type,
                                  "Authorization": f"Bearer {env.token}"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            status = resp.status
            ctype = resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raw, status, ctype = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    return status, json.loads(raw) if ctype.startswith("application/json") else raw.decode()


def start_daemon(env: Env) -> None:
    env.port = free_port()
    env.proc = subprocess.Popen(
        [sys.executable, "-m", "uniframe.cli.main", "daemon", "--listen",
         f"127.0.0.1:{env.port}", "--store", str(env.store), "--period", "0.3",
         "--allow-path", str(env.root)],
        env=env.env, stdin=subprocess.DEVNULL, stdout=(env.root / "daemon.log").open("ab"),
        stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        assert env.proc.poll() is None, (env.root / "daemon.log").read_text()
        with contextlib.suppress(OSError):
            if call(env, "GET", "/openapi.json")[0] == 200:
                return
        assert time.monotonic() < deadline, "the daemon did not answer within 30 s"
        time.sleep(0.1)


def servers(env: Env) -> dict[int, int]:
    """PID -> listening port of every model server this test's daemon started on the host."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if argv[1:3] == ["-m", "uniframe.serve"] and str(env.root) in argv[3]:
            found[int(d.name)] = int(argv[argv.index("--port") + 1])
    return found



def replicas(env: Env) -> list[dict[str, Any]]:
    status, body = call(env, "GET", "/v1/replicas")
    assert status == 200
    return list(body["replicas"])


def metric(env: Env, name: str) -> float:
    """One unlabelled sample from /metrics (the Prometheus text format)."""
    status, text = call(env, "GET", "/metrics")
    assert status == 200
    for line in str(text).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics:\n{text}")


def infer(port: int) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/iris/infer",
                                 json.dumps(IRIS_ROW).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    home = tmp_path / "home"
    home.mkdir()
    e = Env(tmp_path, {**os.environ, "HOME": str(home), "UNIFRAME_STATE": str(tmp_path / "st"),
                       "UNIFRAME_DATA": str(tmp_path / "data"),
                       "UNIFRAME_STORE": str(tmp_path / "unused.db")},
            tmp_path / "state.db", write_iris(tmp_path / "model"))
    try:
        yield e
    finally:
        if e.proc is not None and e.proc.poll() is None:
            e.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                e.proc.wait(30)
            if e.proc.poll() is None:
                e.proc.kill()
                e.proc.wait()
        kill_strays(tmp_path)  # only what this test's daemon started: servers, proxies


def spec(model: Path, replicas: int) -> bytes:
    return (f"apiVersion: uniframe.dev/v1alpha1\nkind: InferenceService\n"
            f"metadata: {{name: iris}}\n"
            f"spec: {{model: {{uri: {model}}}, runtime: process, replicas: {replicas}}}\n").encode()


def test_invalid_spec_is_422_naming_the_field(env: Env) -> None:
    start_daemon(env)
    status, body = call(env, "POST", "/v1/apply", spec(env.model, -1))
    assert status == 422
    assert [e["path"] for e in body["errors"]] == ["spec.replicas"]
    bad = {"apiVersion": "uniframe.dev/v1alpha1", "kind": "InferenceService",
           "metadata": {"name": "iris"}, "spec": {"runtime": "process"}}
    status, body = call(env, "POST", "/v1/apply", json.dumps(bad).encode(), "application/json")
    assert status == 422
    assert "spec.model" in [e["path"] for e in body["errors"]]
    assert call(env, "GET", "/v1/objects")[1] == {"objects": []}
    status, doc = call(env, "GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/v1/apply", "/v1/objects", "/v1/objects/{kind}/{name}", "/v1/replicas",
            "/v1/events", "/metrics"} <= set(doc["paths"])
    assert call(env, "GET", "/v1/objects/InferenceService/iris")[0] == 404
    assert call(env, "DELETE", "/v1/objects/InferenceService/iris")[0] == 404


def test_the_daemon_makes_its_token_once_and_never_prints_it(env: Env) -> None:
    start_daemon(env)
    token = env.token
    token_file = Path(env.env["UNIFRAME_STATE"]) / "daemon.token"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    call(env, "GET", "/v1/objects")
    assert env.proc is not None
    env.proc.send_signal(signal.SIGTERM)
    env.proc.wait(30)
    start_daemon(env)  # a restart keeps the token: clients configured once keep working
    assert env.token == token
    assert call(env, "GET", "/v1/objects")[0] == 200
    log = (env.root / "daemon.log").read_text()
    assert token not in log and str(token_file) in log


@pytest.mark.slow
def test_apply_restart_readopt_delete(env: Env) -> None:
    start_daemon(env)
    status, body = call(env, "POST", "/v1/apply", spec(env.model, 2))
    assert status == 200, body
    assert [{k: a[k] for k in ("kind", "name", "generation", "changed", "action")}
            for a in body["applied"]] == [{"kind": "InferenceService", "name": "iris",
                                           "generation": 1, "changed": True,
                                           "action": "created"}]

    def two_ready() -> list[dict[str, Any]] | None:
        ready = [r for r in replicas(env) if r["state"] == "ready"]
        return ready if len(ready) == 2 else None

    ready = until("two ready replicas", two_ready)
    ports = sorted(r["host_port"] for r in ready)
    for port in ports:
        assert infer(port)["model_name"] == "iris"
    assert sorted(servers(env).values()) == ports

    # kill -9 one replica's server: restarted on its port, counted, with events
    victim = ready[0]
    pid = next(p for p, port in servers(env).items() if port == victim["host_port"])
    os.kill(pid, signal.SIGKILL)
    until("the restart", lambda: any(r["id"] == victim["id"] and r["restarts"] == 1
                                     and r["state"] == "ready" for r in replicas(env)))
    assert infer(victim["host_port"])["model_name"] == "iris"
    assert pid not in servers(env) and len(servers(env)) == 2
    events = call(env, "GET", "/v1/events")[1]["events"]
    reasons = [e["reason"] for e in events if e["replica_id"] == victim["id"]]
    assert "Died" in reasons and "Restarted" in reasons

    # kill -9 the daemon: the replicas keep serving; a new daemon adopts them
    before = servers(env)
    ids = sorted(r["id"] for r in replicas(env))
    assert env.proc is not None
    env.proc.kill()
    env.proc.wait()
    for port in ports:
        assert infer(port)["model_name"] == "iris"
    start_daemon(env)
    until("a few reconcile passes", lambda: metric(env, "uniframe_reconcile_passes_total") >= 5)
    after = replicas(env)
    assert sorted(r["id"] for r in after) == ids
    assert servers(env) == before  # the same processes, no duplicates
    assert [r["restarts"] for r in after if r["id"] == victim["id"]] == [1]
    metrics = call(env, "GET", "/metrics")[1]
    assert 'uniframe_replicas{state="ready"} 2' in metrics

    # delete: replicas and their processes go, then the object itself
    status, body = call(env, "DELETE", "/v1/objects/InferenceService/iris")
    assert status == 200
    until("replicas gone", lambda: not replicas(env) and not servers(env))
    until("object purged", lambda: call(env, "GET", "/v1/objects")[1] == {"objects": []})
    assert call(env, "GET", "/v1/objects/InferenceService/iris")[0] == 404
    reasons = [e["reason"] for e in call(env, "GET", "/v1/events")[1]["events"]]
    assert reasons.count("ReplicaRemoved") == 2
