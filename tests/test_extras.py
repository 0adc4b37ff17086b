"""Commands that need an optional extra say which one, in one line, when it is missing.

Each command runs as a real process in which the extra's modules cannot be
imported (a ``sys.meta_path`` finder refuses them, as an install without
``uniframe[build]`` would), so what is checked is what a user would see: exit
status 2, one line on stderr naming the package and the extra, no traceback,
nothing on stdout. The same harness with nothing refused must still work, so
a passing case is not the harness breaking the command some other way.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from uniframe.extras import BUILD, MissingExtraError, require
from uniframe.runtime.verify import free_port

# Runs the CLI with the modules named in argv[1] (comma-separated) made unimportable.
BLOCKING_CLI = """
import sys
BLOCKED = set(filter(None, sys.argv[1].split(",")))
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NotInstalled())
sys.argv = ["uniframe", *sys.argv[2:]]
from uniframe.cli.main import main
main()
"""

INSTALL_BUILD = "pip install 'uniframe[build]'"


def uniframe_without(blocked: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKING_CLI, blocked, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pickled estimator and a spec that uses it; data and state kept under ``tmp_path``."""
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("UNIFRAME_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("UNIFRAME_STATE", str(tmp_path / "st"))
    # nothing listens here: a command that got as far as the daemon would say so instead
    monkeypatch.setenv("UNIFRAME_DAEMON", f"http://127.0.0.1:{free_port()}")
    features, target = load_iris(return_X_y=True)
    tree = DecisionTreeClassifier(max_depth=2, random_state=0).fit(features, target)
    (tmp_path / "tree.pkl").write_bytes(pickle.dumps(tree))
    (tmp_path / "svc.yaml").write_text(
        "apiVersion: uniframe.dev/v1alpha1\nkind: InferenceService\nmetadata: {name: tree}\n"
        "spec:\n  model: {uri: ./tree.pkl}\n  runtime: process\n")
    return tmp_path


CASES = [
    # (modules made unimportable, command, what the message starts with)
    ("sklearn", ["examples", "iris", "out"],
     "uniframe examples iris needs scikit-learn, which is not installed"),
    ("onnx", ["examples", "iris", "out"], "uniframe examples iris needs onnx, which is not installed"),
    ("skl2onnx", ["examples", "iris", "out"],
     "uniframe examples iris needs skl2onnx, which is not installed"),
    # scikit-learn present but broken: its own dependency is missing
    ("scipy", ["examples", "iris", "out"],
     "uniframe examples iris needs scikit-learn, which cannot be imported (No module named "
     "'scipy')"),
    ("skl2onnx", ["convert", "tree.pkl", "-o", "tree.onnx"],
     "uniframe convert needs skl2onnx, which is not installed"),
    ("sklearn", ["model", "push", "tree.pkl", "--name", "tree"],
     "uniframe model push tree.pkl (converting scikit-learn to ONNX) needs scikit-learn, which "
     "is not installed"),
    ("skl2onnx", ["build", "svc.yaml", "--no-verify"],
     "converting tree.pkl (scikit-learn) to ONNX needs skl2onnx, which is not installed"),
]


@pytest.mark.parametrize(("blocked", "args", "message"), CASES,
                         ids=[f"{' '.join(c[1][:2])}-without-{c[0]}" for c in CASES])
def test_a_missing_extra_is_one_line_that_names_it(workdir: Path, blocked: str, args: list[str],
                                                    message: str) -> None:
    result = uniframe_without(blocked, *args, cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {message}: {INSTALL_BUILD}"]
    assert result.stdout == ""
    assert not (workdir / "out").exists() and not (workdir / "tree.onnx").exists()


def test_the_harness_alone_leaves_the_commands_working(workdir: Path) -> None:
    """The control for the cases above: refusing nothing, the same harness converts."""
    result = uniframe_without("", "convert", "tree.pkl", "-o", "tree.onnx", cwd=workdir)
    assert result.returncode == 0, result.stderr
    import onnx

    model = onnx.load(workdir / "tree.onnx")
    assert [i.name for i in model.graph.input] == ["X"]


def test_require_in_process_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    require("anything")  # installed here: no error
    monkeypatch.setitem(sys.modules, "onnx", None)  # an import of onnx now fails
    with pytest.raises(MissingExtraError) as caught:
        require("converting x")
    assert str(caught.value) == ("converting x needs onnx, which is not installed: "
                                 f"{INSTALL_BUILD}")
    assert caught.value.extra is BUILD and caught.value.package == "onnx"
