"""scripts/check_collected.py: a test file pytest does not collect is named, never passed over.

The guard exists because pytest skipped ``tests/build`` silently for months;
these tests run real ``pytest --collect-only -q`` in a scratch project with a
``tests/build`` folder, so the output format the guard parses is pytest's own.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_guard() -> ModuleType:
    path = REPO / "scripts" / "check_collected.py"
    spec = importlib.util.spec_from_file_location("check_collected", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


guard = _load_guard()

TRACKED = ["tests/build/test_kernel.py", "tests/spec/test_spec.py", "tests/test_top.py",
           "tests/spec/data/service.yaml", "tests/spec/helpers.py", "bench/test_bench.py"]


def _project(tmp_path: Path, pytest_options: str) -> Path:
    for rel in ("tests/build/test_kernel.py", "tests/spec/test_spec.py", "tests/test_top.py"):
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("import pytest\n\n@pytest.mark.parametrize('n', [1, 2])\n"
                     "def test_one(n: int) -> None:\n    assert n\n")
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.pytest.ini_options]\ntestpaths = ["tests"]\naddopts = "-ra"\n{pytest_options}\n')
    return tmp_path


def _collect(root: Path) -> str:
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider"], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_a_folder_pytest_does_not_collect_is_reported(tmp_path: Path) -> None:
    # pytest's default norecursedirs has "build"; spelt out so that the test does not
    # depend on that default
    output = _collect(_project(tmp_path, 'norecursedirs = ["build"]'))
    assert "tests/spec/test_spec.py::test_one[1]" in output  # the scratch project collects
    assert guard.missing_files(TRACKED, output) == ["tests/build/test_kernel.py"]


def test_the_repository_norecursedirs_collects_a_build_folder(tmp_path: Path) -> None:
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "build" not in options["norecursedirs"]
    output = _collect(_project(tmp_path, f"norecursedirs = {json.dumps(options['norecursedirs'])}"))
    assert guard.missing_files(TRACKED, output) == []


@pytest.mark.parametrize("line", [
    "tests/serve/test_triton.py::test_infer",
    "tests/serve/test_triton.py::TestClient::test_infer[json-1]",
    "SKIPPED [1] tests/serve/test_triton.py:9: could not import 'tritonclient.http'",
])
def test_ids_and_module_level_skips_count_as_collected(line: str) -> None:
    output = f"{line}\n\n1 test collected in 0.01s\n"
    assert guard.collected_files(output) == {"tests/serve/test_triton.py"}
    assert guard.missing_files(["tests/serve/test_triton.py"], output) == []


@pytest.mark.parametrize("line", ["ERROR tests/serve/test_triton.py",
                                  "ERROR tests/serve/test_triton.py - ImportError: no module x"])
def test_a_file_that_fails_to_import_is_an_error_not_collected(line: str) -> None:
    output = f"tests/spec/test_spec.py::test_one[1]\n{line}\n1 test collected, 1 error in 0.1s\n"
    assert guard.collected_files(output) == {"tests/spec/test_spec.py"}
    assert guard.errored_files(output) == {"tests/serve/test_triton.py"}


@pytest.mark.parametrize(("path", "expected"), [
    ("tests/images/test_kernel.py", True),
    ("tests/test_top.py", True),
    ("tests/spec/helpers.py", False),
    ("tests/runtime/conftest.py", False),
    ("bench/test_bench.py", False),
    ("tests/spec/data/test_x.yaml", False),
])
def test_which_files_are_test_files(path: str, expected: bool) -> None:
    assert guard.is_test_file(path) is expected
