"""``uniframe model`` as users run it, and ``uniframe build`` of a spec that pins ``iris@1``.

The commands run as the real console script (a fresh process each, like a
user's shell) and talk to a real daemon over HTTP, which keeps the registry
on each store backend in turn.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from control_helpers import running_daemon

from uniframe.build.examples import write_iris
from uniframe.build.images import build_image
from uniframe.build.store import ImageStore
from uniframe.errors import BuildError
from uniframe.spec import InferenceService, load_file


@pytest.fixture(scope="module")
def iris_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_iris(tmp_path_factory.mktemp("iris"))


@pytest.fixture
def env(store_target: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """This test's own data, state, store and daemon, for this process and the commands it runs."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("UNIFRAME_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("UNIFRAME_STATE", str(tmp_path / "st"))
    monkeypatch.setenv("UNIFRAME_STORE", store_target)
    with running_daemon(store_target, tmp_path) as live:
        monkeypatch.setenv("UNIFRAME_DAEMON", live.url)
        yield os.environ.copy()


def uniframe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uniframe.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_push_ls_inspect_rm(env: dict[str, str], iris_file: Path, tmp_path: Path) -> None:
    first = uniframe(env, "model", "push", str(iris_file), "--name", "iris", "--meta", "team=ml")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("pushed iris@1  (onnx, ")
    again = uniframe(env, "model", "push", str(iris_file), "--name", "iris")
    assert "iris@1 already holds these bytes" in again.stdout and again.returncode == 0
    labelled = uniframe(env, "model", "push", str(iris_file), "--name", "iris",
                        "--version", "prod", "-o", "json")
    assert json.loads(labelled.stdout)["model"]["version"] == "prod"

    table = uniframe(env, "model", "ls")
    assert table.returncode == 0
    rows = [line.split() for line in table.stdout.splitlines()]
    assert rows[0][:4] == ["NAME", "VERSION", "FORMAT", "SIZE"]
    assert [r[:3] for r in rows[1:]] == [["iris", "1", "onnx"], ["iris", "prod", "onnx"]]
    listed = json.loads(uniframe(env, "model", "ls", "-o", "json").stdout)["models"]
    assert [(m["name"], m["version"], m["metadata"]) for m in listed] == \
        [("iris", "1", {"team": "ml"}), ("iris", "prod", {})]
    assert yaml.safe_load(uniframe(env, "model", "ls", "iris", "-o", "yaml").stdout) == {
        "models": listed}

    shown = yaml.safe_load(uniframe(env, "model", "inspect", "iris@1").stdout)
    assert shown["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    assert Path(shown["path"]).read_bytes() == iris_file.read_bytes()
    assert shown["used_by"] == []

    spec = _spec(tmp_path, "iris@1")
    applied = uniframe(env, "apply", "-f", str(spec))
    assert applied.returncode == 0, applied.stderr
    refused = uniframe(env, "model", "rm", "iris@1")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: model iris@1 is in use by InferenceService/flowers; change those specs to another "
        "model version or delete them, then remove it")
    assert json.loads(uniframe(env, "model", "inspect", "iris@1", "-o", "json").stdout)[
        "used_by"] == ["InferenceService/flowers"]
    removed = uniframe(env, "model", "rm", "iris@prod")
    assert (removed.returncode, removed.stdout.strip()) == (0, "removed iris@prod")
    models = json.loads(uniframe(env, "model", "ls", "-o", "json").stdout)["models"]
    assert [m["version"] for m in models] == ["1"]


def test_mistakes_get_one_clear_line(env: dict[str, str], tmp_path: Path) -> None:
    junk = tmp_path / "model.onnx"
    junk.write_text("not a model")
    cases = [
        (("model", "push", str(junk), "--name", "x"), "is not an ONNX model ONNX Runtime can load"),
        (("model", "inspect", "iris"), "write NAME@VERSION, e.g. iris@1"),
        (("model", "rm", "iris@1"), "iris@1 is not in the registry"),
        (("model", "push", str(junk), "--name", "x", "--meta", "novalue"), "write KEY=VALUE"),
        (("model", "ls", "-o", "xml"), "use one of table, json, yaml"),
    ]
    for args, message in cases:
        result = uniframe(env, *args)
        assert result.returncode == 2, args
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    empty = uniframe(env, "model", "ls")
    assert "no models; push one with `uniframe model push FILE --name NAME`" in empty.stdout


def _spec(tmp_path: Path, model: str, runtime: str = "process") -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(f"""apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {{name: flowers}}
spec:
  model: {model}
  runtime: {runtime}
""")
    return path


def test_build_a_spec_that_pins_a_registry_model_and_serve_it(
        env: dict[str, str], iris_file: Path, tmp_path: Path) -> None:
    """The whole path: push, build (process runtime), start it and answer an inference."""
    assert uniframe(env, "model", "push", str(iris_file), "--name", "iris").returncode == 0
    built = uniframe(env, "build", str(_spec(tmp_path, "iris@1")), "-o", "json")
    assert built.returncode == 0, built.stderr
    summary = json.loads(built.stdout)
    assert summary["kind"] == "process"
    assert summary["verify"]["seconds_to_first_inference"] > 0  # it served an inference
    image = ImageStore().resolve(summary["image"])
    model = image.manifest["model"]
    assert (model["name"], model["version"]) == ("flowers", "1")
    assert model["sha256"] == image.manifest["files"]["model"]["sha256"]
    assert (image.dir / "model.onnx").read_bytes() == iris_file.read_bytes()


def test_build_says_what_is_wrong_with_a_registry_model(
        env: dict[str, str], iris_file: Path, tmp_path: Path) -> None:
    def build(model: str) -> None:
        doc = load_file(_spec(tmp_path, model))[0]
        assert isinstance(doc.spec, InferenceService)
        build_image(doc.spec, source_digest=doc.digest(), runtime="process")

    with pytest.raises(BuildError, match=r"spec.model: model iris@1 is not in the model registry"):
        build("iris@1")
    assert uniframe(env, "model", "push", str(iris_file), "--name", "iris").returncode == 0
    with pytest.raises(BuildError, match=r"iris@1 was pushed as onnx, but the spec insists on "
                                         r"format sklearn"):
        build("{name: iris, version: 1, format: sklearn}")
    build("{name: iris, version: 1, format: onnx}")
    assert [i.manifest["model"]["version"] for i in ImageStore().list()] == ["1"]
