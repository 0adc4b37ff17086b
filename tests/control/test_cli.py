"""The CLI as the daemon's client: every command against a real daemon, real HTTP, real replicas.

Commands run in this process through Typer's test runner (the error
boundary lives in the app itself, so what users would see on stderr and the
exit status are what is checked here); the two that never end on their own
(``events -w``, ``logs -f``) run as real processes and are stopped.
Tables are parsed back by whitespace, ``-o json`` and ``-o yaml`` by their
parsers, and compared with what the API itself answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from control_helpers import SERVICE, LiveDaemon, running_daemon, service_yaml, until
from typer.testing import CliRunner, Result

import uniframe.cli.main  # registers every command
from uniframe.build.examples import write_iris
from uniframe.cli.app import app
from uniframe.runtime.verify import free_port


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_iris(tmp_path_factory.mktemp("iris"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("UNIFRAME_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("UNIFRAME_STATE", str(tmp_path / "st"))
    monkeypatch.setenv("UNIFRAME_STORE", str(tmp_path / "unused.db"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def live(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveDaemon]:
    with running_daemon(home / "state.db", home) as daemon:
        monkeypatch.setenv("UNIFRAME_DAEMON", daemon.url)
        yield daemon


def cli(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=input, catch_exceptions=False)


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


def api(live: LiveDaemon, path: str) -> Any:
    response = httpx.get(live.url + path, timeout=10, headers=live.headers)
    assert response.status_code == 200, response.text
    return response.json()



def test_without_a_daemon_every_command_says_how_to_start_one(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("UNIFRAME_DAEMON", url)
    (home / "svc.yaml").write_text(service_yaml("iris@1"))
    expected = (f"error: no uniframe daemon at {url}: start one with `uniframe daemon` "
                "(or point --daemon / $UNIFRAME_DAEMON at the one you run)")
    for args in (["get"], ["get", "replicas"], ["apply", "-f", "svc.yaml"], ["describe", "iris"],
                 ["delete", "iris"], ["events"], ["model", "ls"], ["rollout", "status", "iris"],
                 ["rollout", "history", "iris"]):
        result = cli(*args)
        assert result.exit_code == 2, args
        assert result.stderr.strip() == expected, (args, result.stderr)
        assert "Traceback" not in result.output
    other = f"http://127.0.0.1:{free_port()}"
    assert other in cli("get", "--daemon", other).stderr
    # logs falls back to the replicas `uniframe run` keeps on this host
    result = cli("logs", "nope")
    assert result.exit_code == 2
    assert "no replica 'nope'" in result.stderr and "uniframe ps -a" in result.stderr


def test_apply_rejects_invalid_specs_by_field_path(live: LiveDaemon, home: Path,
                                                  iris: Path) -> None:
    (home / "good.yaml").write_text(service_yaml(f"{{uri: {iris}}}"))
    (home / "bad.yaml").write_text(
        service_yaml(f"{{uri: {iris}}}", name="other", replicas=-1) + "  replica: 2\n")
    result = cli("apply", "-f", "good.yaml", "-f", "bad.yaml")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: bad.yaml, document 1: spec.replicas: must be 0 or more, got the number -1",
        "error: bad.yaml, document 1: spec.replica: unknown field; did you mean 'replicas'?",
    ]
    assert "Traceback" not in result.output and result.stdout == ""
    assert api(live, "/v1/objects") == {"objects": []}  # good.yaml was not applied either
    missing = cli("apply", "-f", "nope.yaml")
    assert (missing.exit_code, missing.stderr.strip()) == (2, "error: nope.yaml: no such file")
    pinned = cli("apply", "-f", "-", input=service_yaml("iris@4"))
    assert pinned.exit_code == 2
    assert pinned.stderr.startswith("error: <stdin>, document 1: spec.model: model iris@4 is not "
                                    "in the registry; push it with `uniframe model push")


def test_apply_get_describe_logs_events_delete(live: LiveDaemon, home: Path, iris: Path) -> None:
    spec = home / "specs" / "svc.yaml"
    spec.parent.mkdir()
    (spec.parent / "iris.onnx").write_bytes(iris.read_bytes())
    spec.write_text(service_yaml("{uri: ./iris.onnx}", replicas=2))  # relative to the file

    dry = cli("apply", "-f", str(spec), "--dry-run")
    assert dry.stdout == "InferenceService/iris created (dry run)\n"
    assert api(live, "/v1/objects") == {"objects": []}
    applied = cli("apply", "-f", str(spec), "--wait")
    assert applied.exit_code == 0, applied.output
    lines = applied.stdout.splitlines()
    assert lines[0] == "InferenceService/iris created"
    assert lines[-1].startswith("InferenceService/iris: 2/2 ready, revision 1 complete")
    again = cli("apply", "-f", "-", "--wait", input=spec.read_text().replace(
        "./iris.onnx", str(spec.parent / "iris.onnx")))
    assert again.stdout.splitlines()[0] == "InferenceService/iris unchanged"

    objects = api(live, "/v1/objects")
    port = objects["objects"][0]["endpoint"]["port"]
    table = rows(cli("get").stdout)
    assert table[0] == ["NAME", "KIND", "RUNTIME", "READY", "REVISION", "ROLLOUT", "ENDPOINT",
                        "AGE"]
    assert table[1][:7] == ["iris", SERVICE, "process", "2/2", "1", "complete",
                            f"127.0.0.1:{port}"]
    assert rows(cli("get", "iris").stdout)[1][:4] == rows(cli("get", "svc", "iris").stdout)[1][:4]
    as_json = json.loads(cli("get", "-o", "json").stdout)
    assert [o["name"] for o in as_json["objects"]] == ["iris"]
    assert as_json["objects"][0]["spec"] == objects["objects"][0]["spec"]
    one = yaml.safe_load(cli("get", "iris", "-o", "yaml").stdout)
    assert one["endpoint"] == {"host": "127.0.0.1", "port": port}
    assert len(one["replicas"]) == 2
    ids = sorted(r["id"] for r in one["replicas"])

    replicas = rows(cli("get", "replicas").stdout)
    assert replicas[0][:4] == ["ID", "OBJECT", "DRIVER", "STATE"]
    assert sorted(r[0] for r in replicas[1:]) == ids
    assert all(r[1:4] == [f"{SERVICE}/iris", "process", "ready"] for r in replicas[1:])
    assert [r["id"] for r in json.loads(cli("get", "replicas", "iris", "-o", "json").stdout)[
        "replicas"]] == [r["id"] for r in api(live, "/v1/replicas")["replicas"]]
    unknown = cli("get", "gadgets", "x")
    assert unknown.exit_code == 2 and "unknown kind 'gadgets'" in unknown.stderr
    assert cli("get", "nothere").stderr.strip() == (
        "error: InferenceService/nothere does not exist; see `uniframe get`")

    described = cli("describe", "iris").stdout
    assert f"Endpoint:    http://127.0.0.1:{port}" in described
    assert "Replicas:    2/2 ready (ready: 2)" in described
    assert "Rollout:     revision 1, rolling, complete" in described
    # the CLI uploaded the model: the daemon serves its own content-addressed copy
    digest = hashlib.sha256((spec.parent / "iris.onnx").read_bytes()).hexdigest()
    uploaded = home / "data" / "uploads" / digest / "iris.onnx"
    assert f"Model:       {uploaded} (onnx)" in described
    assert all(i in described for i in ids) and "RolloutComplete" in described
    full = json.loads(cli("describe", f"{SERVICE}/iris", "-o", "json").stdout)
    assert full["name"] == "iris" and full["events"][-1]["reason"] == "RolloutComplete"

    logs = cli("logs", "iris", "--tail", "1").stdout.splitlines()
    assert sorted(line.split("]")[0][1:] for line in logs) == ids
    assert all("uniframe-serve: serving iris" in line for line in logs)
    assert cli("logs", ids[0][:5]).stdout.startswith("uniframe-serve: serving iris")

    events = rows(cli("events", "iris").stdout)
    assert events[0] == ["AGE", "TYPE", "REASON", "MESSAGE"]
    assert "RolloutComplete" in [e[2] for e in events[1:]]
    listed = yaml.safe_load(cli("events", "--tail", "2", "-o", "yaml").stdout)
    assert listed == {"events": api(live, "/v1/events?tail=2")["events"]}

    deleted = cli("delete", "-f", str(spec))
    assert deleted.stdout == "InferenceService/iris deleted\n"
    until("iris gone", lambda: cli("get").stdout.startswith("no objects"))
    assert cli("delete", "iris").exit_code == 2


def uniframe(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "uniframe.cli.main", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())


def test_events_watch_and_logs_follow_stream(live: LiveDaemon, home: Path, iris: Path) -> None:
    assert cli("apply", "-f", "-", "--wait",
               input=service_yaml(f"{{uri: {iris}}}")).exit_code == 0
    watch = uniframe("events", "iris", "-w", "--tail", "1", "-o", "json")
    follow: subprocess.Popen[str] | None = None
    try:
        assert watch.stdout is not None
        # the newest event first: once it is printed the watcher is polling
        assert json.loads(watch.stdout.readline())["reason"] == "RolloutComplete"
        assert cli("apply", "-f", "-", input=service_yaml(f"{{uri: {iris}}}",
                                                          replicas=2)).exit_code == 0
        seen = []
        while "Ready" not in seen:
            seen.append(json.loads(watch.stdout.readline())["reason"])
        assert seen[0] == "Updated" and "ReplicaCreated" in seen, seen
        follow = uniframe("logs", "iris", "-f")
        assert follow.stdout is not None
        assert "uniframe-serve: serving iris" in follow.stdout.readline()
        assert follow.poll() is None  # still following
    finally:
        for proc in (watch, follow):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def test_apply_wait_fails_when_the_rollout_fails(live: LiveDaemon, iris: Path) -> None:
    good = service_yaml(f"{{uri: {iris}}}", name="fragile")
    assert cli("apply", "-f", "-", "--wait", input=good).exit_code == 0
    # revision 2's interpreter cannot start: its replicas die, the rollout rolls back
    broken = good + "  env: {PYTHONHOME: /nonexistent}\n"
    result = cli("apply", "-f", "-", "--wait", "--timeout", "60", input=broken)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: InferenceService/fragile: ")
    assert "revision 2 rolled-back: new replica" in result.stderr
    assert "rolled back to revision 1" in result.stderr


def test_model_and_rollout_commands(live: LiveDaemon, home: Path, iris: Path) -> None:
    assert cli("model", "push", str(iris), "--name", "iris").exit_code == 0
    assert cli("model", "push", str(iris), "--name", "iris", "--version", "2").exit_code == 0
    assert [r[:2] for r in rows(cli("get", "models").stdout)] == [
        ["NAME", "VERSION"], ["iris", "1"], ["iris", "2"]]
    assert cli("apply", "-f", "-", "--wait",
               input=service_yaml("iris@1", replicas=2)).exit_code == 0
    assert cli("apply", "-f", "-", "--wait",
               input=service_yaml("iris@2", replicas=2)).exit_code == 0

    history = rows(cli("rollout", "history", "iris").stdout)
    assert history[0] == ["REVISION", "MODEL", "RUNTIME", "DIGEST", "AGE", "CURRENT"]
    assert [(r[0], r[1]) for r in history[1:]] == [("1", "iris@1"), ("2", "iris@2")]
    assert history[2][-1] == "*" and history[1][-1] != "*"
    status = cli("rollout", "status", "iris").stdout
    assert status.startswith("InferenceService/iris: revision 2 (from 1), rolling, complete")
    assert json.loads(cli("rollout", "status", "iris", "-o", "json").stdout)["updated_ready"] == 2
    promote = cli("rollout", "promote", "iris")
    assert promote.exit_code == 2 and "has no canary to promote" in promote.stderr
    bad = cli("rollout", "undo", "iris", "--to-revision", "7")
    assert bad.exit_code == 2 and "has no revision 7 (its revisions: 1, 2)" in bad.stderr

    undo = cli("rollout", "undo", "iris", "--to-revision", "1")
    assert undo.stdout.startswith("InferenceService/iris rolling back to revision 1")
    watched = cli("rollout", "status", "-w", "iris")
    assert watched.exit_code == 0
    assert " complete: " in watched.stdout.splitlines()[-1]
    revisions = json.loads(cli("rollout", "history", "iris", "-o", "json").stdout)["revisions"]
    assert revisions[-1]["spec"]["spec"]["model"] == {"name": "iris", "version": 1}
    table = rows(cli("get").stdout)
    assert table[1][3:6] == ["2/2", str(revisions[-1]["number"]), "complete"]
