"""Every read command takes ``-o table|json|yaml``, and its JSON and YAML are one document.

One daemon (with a pushed model and a service rolled out on the process
runtime, which also puts an image in the local store and replicas on the
host) serves every case; a fake bzImage stands in for a built kernel. Each
command's ``-o json`` and ``-o yaml`` are parsed back, must be equal, and
must hold what the command is about; ``-o table`` must work too, and an
unknown ``-o`` is the same one-line error everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from control_helpers import SERVICE, LiveDaemon, running_daemon, service_yaml
from typer.testing import CliRunner, Result

import uniframe.cli.main  # noqa: F401  (registers every command)
from uniframe.build.examples import write_iris
from uniframe.cli.app import app


@dataclass
class World:
    live: LiveDaemon
    root: Path
    kernel: Path

    def api(self, path: str) -> Any:
        response = httpx.get(self.live.url + path, timeout=10, headers=self.live.headers)
        assert response.status_code == 200, response.text
        return response.json()


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("UNIFRAME_DATA", str(root / "data"))
        mp.setenv("UNIFRAME_STATE", str(root / "st"))
        mp.setenv("UNIFRAME_STORE", str(root / "unused.db"))
        mp.chdir(root)
        iris = write_iris(root)
        kernel = root / "bzImage"  # what boot_protocol needs to call it a bzImage
        header = bytearray(0x240)
        header[0x1FE:0x200] = b"\x55\xaa"
        header[0x202:0x206] = b"HdrS"
        kernel.write_bytes(bytes(header))
        with running_daemon(root / "state.db", root) as live:
            mp.setenv("UNIFRAME_DAEMON", live.url)
            assert cli("model", "push", str(iris), "--name", "iris").exit_code == 0
            (root / "svc.yaml").write_text(service_yaml("iris@1"))
            applied = cli("apply", "-f", "svc.yaml", "--wait")
            assert applied.exit_code == 0, applied.output
            yield World(live, root, kernel)


def _names(items: list[dict[str, Any]]) -> list[str]:
    return [i["name"] for i in items]


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    check: Callable[[World, Any], None]
    """Asserts on the parsed document what this command is about."""


def _image(w: World, doc: Any) -> None:
    assert {i["kind"] for i in doc} == {"process"} and doc[0]["digest"].startswith("sha256:")
    assert ["iris-process:latest"] in [i["names"] for i in doc]


def _image_inspect(w: World, doc: Any) -> None:
    assert doc["manifest"]["kind"] == "process" and doc["manifest"]["model"]["name"] == "iris"


def _ps(w: World, doc: Any) -> None:
    assert [r["id"] for r in doc] == [r["id"] for r in w.api("/v1/replicas")["replicas"]]
    assert doc[0]["status"]["state"] == "running"


def _kernel(w: World, doc: Any) -> None:
    assert (doc["boot"], w.root / doc["path"], doc["size_bytes"]) == ("bzimage", w.kernel, 0x240)


def _get(w: World, doc: Any) -> None:
    assert _names(doc["objects"]) == ["iris"] and doc["objects"][0]["kind"] == SERVICE


def _get_one(w: World, doc: Any) -> None:
    assert doc["name"] == "iris" and doc["endpoint"] == w.api(f"/v1/objects/{SERVICE}/iris")[
        "endpoint"]


def _replicas(w: World, doc: Any) -> None:
    assert [r["id"] for r in doc["replicas"]] == [r["id"] for r in w.api("/v1/replicas")[
        "replicas"]]


def _models(w: World, doc: Any) -> None:
    assert doc == w.api("/v1/models")


def _describe(w: World, doc: Any) -> None:
    assert doc["name"] == "iris" and "RolloutComplete" in [e["reason"] for e in doc["events"]]


def _events(w: World, doc: Any) -> None:
    assert doc == w.api("/v1/events?tail=3")


def _rollout(w: World, doc: Any) -> None:
    assert (doc["name"], doc["state"]) == ("iris", "complete")


def _history(w: World, doc: Any) -> None:
    assert doc == w.api(f"/v1/objects/{SERVICE}/iris/revisions")


def _build(w: World, doc: Any) -> None:
    """Not a read command, but it prints a document: the image it built, now in the store."""
    assert (doc["kind"], doc["names"], "verify" in doc) == ("process", ["iris-process:latest"],
                                                            False)
    assert doc["image"] in [i["digest"] for i in json.loads(cli("images", "-o", "json").stdout)]


def _model_inspect(w: World, doc: Any) -> None:
    assert (doc["name"], doc["version"], doc["used_by"]) == ("iris", "1", [f"{SERVICE}/iris"])


CASES = {
    "images": Case(("images",), _image),
    "image inspect": Case(("image", "inspect", "iris-process"), _image_inspect),
    "ps": Case(("ps",), _ps),
    "kernel info": Case(("kernel", "info", "--kernel", "bzImage"), _kernel),
    "get": Case(("get",), _get),
    "get NAME": Case(("get", "iris"), _get_one),
    "get replicas": Case(("get", "replicas"), _replicas),
    "get models": Case(("get", "models"), _models),
    "describe": Case(("describe", "iris"), _describe),
    "events": Case(("events", "--tail", "3"), _events),
    "rollout status": Case(("rollout", "status", "iris"), _rollout),
    "rollout history": Case(("rollout", "history", "iris"), _history),
    "model ls": Case(("model", "ls"), _models),
    "model inspect": Case(("model", "inspect", "iris@1"), _model_inspect),
    "build": Case(("build", "svc.yaml", "--no-verify"), _build),
}


@pytest.mark.parametrize("name", list(CASES))
def test_read_command_prints_json_and_yaml_of_one_document(world: World, name: str) -> None:
    case = CASES[name]
    as_json = cli(*case.args, "-o", "json")
    assert as_json.exit_code == 0, as_json.output
    as_yaml = cli(*case.args, "--output", "yaml")
    assert as_yaml.exit_code == 0, as_yaml.output
    doc = json.loads(as_json.stdout)
    assert yaml.safe_load(as_yaml.stdout) == doc
    case.check(world, doc)
    table = cli(*case.args, "-o", "table")
    assert table.exit_code == 0, table.output
    assert table.stdout.strip() and table.stdout.strip() != as_json.stdout.strip()
    wrong = cli(*case.args, "-o", "xml")
    assert (wrong.exit_code, wrong.stderr.strip()) == (
        2, "error: -o 'xml': use one of table, json, yaml")


def test_inspect_tables_show_the_one_thing(world: World) -> None:
    image = json.loads(cli("image", "inspect", "iris-process").stdout)  # JSON by default
    fields = {label: value.strip() for label, value in (
        line.split(":", 1) for line in
        cli("image", "inspect", "iris-process", "-o", "table").stdout.splitlines())}
    assert (fields["Image"], fields["Kind"], fields["Directory"]) == (
        image["digest"], "process", image["dir"])
    model = yaml.safe_load(cli("model", "inspect", "iris@1").stdout)  # YAML by default
    lines = cli("model", "inspect", "iris@1", "-o", "table").stdout.splitlines()
    assert lines[0].split() == ["Model:", "iris@1"]
    assert f"SHA256:   {model['sha256']}" in lines and f"Used by:  {SERVICE}/iris" in lines
