"""``uniframe validate`` in-process through Typer's runner, and once as the real console script."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from uniframe.cli.app import app
from uniframe.cli.main import main  # noqa: F401  (registers every command on app)

DATA = Path(__file__).parent / "data"
EXAMPLE = Path(__file__).parents[2] / "examples" / "iris" / "service.yaml"
runner = CliRunner()


def test_valid_files_print_one_ok_line_per_document() -> None:
    result = runner.invoke(app, ["validate", str(DATA / "service.yaml"), str(DATA / "several.yaml")])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"ok  {DATA / 'service.yaml'}: InferenceService/iris (document 1)",
        f"ok  {DATA / 'several.yaml'}: InferenceService/iris (document 1)",
        f"ok  {DATA / 'several.yaml'}: Workload/legacy-db (document 3)",
        f"ok  {DATA / 'several.yaml'}: Workload/web (document 4)",
    ]
    # the files these specs name do not exist here: warned about, not failed
    assert f"warning: {DATA / 'service.yaml'}, document 1: spec.model.uri: {DATA / 'models' / 'iris.onnx'} does not exist (yet)" in result.stderr


def test_invalid_documents_go_to_stderr_and_exit_2() -> None:
    path = DATA / "invalid.yaml"
    result = runner.invoke(app, ["validate", str(DATA / "service.yaml"), str(path)])
    assert result.exit_code == 2
    assert f"ok  {path}: InferenceService/good (document 1)" in result.stdout.splitlines()
    assert "bad" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {path}, document 2: spec.resources.memory: '256Mb' is not a size, use e.g. 256Mi",
        f"error: {path}, document 2: spec.replica: unknown field; did you mean 'replicas'?",
    ]


def test_missing_file_and_syntax_error() -> None:
    result = runner.invoke(app, ["validate", "no-such.yaml", str(DATA / "broken.yaml")])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[0] == "error: no-such.yaml: no such file"
    assert f"error: {DATA / 'broken.yaml'}, document 1, line 6, column 4: invalid YAML" in result.stderr


def test_json_output_is_the_normalised_documents() -> None:
    result = runner.invoke(app, ["validate", "-o", "json", str(DATA / "several.yaml")])
    assert result.exit_code == 0, result.output
    docs = json.loads(result.stdout)
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("InferenceService", "iris"), ("Workload", "legacy-db"), ("Workload", "web"),
    ]
    assert docs[0]["spec"]["model"] == {"name": "iris", "version": 3, "format": None}
    assert docs[0]["spec"]["resources"] == {"cpus": 1.0, "memory": 256 * 1024**2}
    assert docs[1]["spec"]["resources"]["memory"] == 1024**3
    assert docs[1]["spec"]["image"] == str(DATA / "disks" / "debian.qcow2")
    assert docs[1]["spec"]["runtime"] == "vm"


def test_bad_output_format() -> None:
    result = runner.invoke(app, ["validate", "-o", "xml", str(DATA / "service.yaml")])
    assert result.exit_code == 2
    assert "--output 'xml': use text or json" in result.stderr


def test_real_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "uniframe"
    command = str(script) if script.exists() else shutil.which("uniframe")
    assert command is not None, "the uniframe console script is not installed (pip install -e .)"
    good = subprocess.run([command, "validate", str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert good.stdout == f"ok  {EXAMPLE}: InferenceService/iris (document 1)\n"

    bad = tmp_path / "svc.yaml"
    bad.write_text(EXAMPLE.read_text().replace("256Mi", "256Mb") + "---\n"
                   + EXAMPLE.read_text().replace("replicas:", "replica:"))
    result = subprocess.run([command, "validate", str(bad), str(EXAMPLE)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == f"ok  {EXAMPLE}: InferenceService/iris (document 1)\n"
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {bad}, document 1: spec.resources.memory: '256Mb' is not a size, use e.g. 256Mi",
        f"error: {bad}, document 2: spec.replica: unknown field; did you mean 'replicas'?",
    ]
    assert "Traceback" not in result.stderr
