"""The proof without a VM: the traced closure of the iris server serves from a bare chroot.

If this fails, the closure is incomplete: fix the tracer or the resolver, never this test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from uniframe.build.closure.materialize import materialize, tree_digest
from uniframe.build.closure.model import Closure
from uniframe.build.closure.trace import WarmupRequest, trace
from uniframe.build.examples import write_iris

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot and mount need root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare"),
]

SETOSA = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                      "data": [5.1, 3.5, 1.4, 0.2]}]}
# What the guest gives the app: no inherited environment.
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/root"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_argv(model: Path, port: int) -> list[str]:
    return ["uniframe.serve", str(model), "--name", "iris", "--port", str(port),
            "--host", "127.0.0.1"]


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> tuple[Closure, Path]:
    model = write_iris(tmp_path_factory.mktemp("model"))
    port = _free_port()
    closure = trace(
        _serve_argv(model, port),
        env=ENV,
        ready_url=f"http://127.0.0.1:{port}/v2/health/ready",
        warmup=[WarmupRequest("POST", "/v2/models/iris/infer", json.dumps(SETOSA).encode(),
                              {"Content-Type": "application/json"})],
        timeout=120,
        extra_imports=[],
        extra_files=[model],
        cwd=Path("/"),
    )
    return closure, model


def test_iris_closure_serves_in_a_chroot(
    iris: tuple[Closure, Path], tmp_path: Path,
) -> None:
    closure, model = iris
    root = tmp_path / "root"
    stats = materialize(closure, root)
    assert stats.stripped_files > 0
    (root / "proc").mkdir()  # the guest init mounts /proc the same way
    port = _free_port()
    argv = [closure.interpreter, "-m", *_serve_argv(model, port)]
    log = tmp_path / "chroot.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c",
             'chroot="$1"; shift; mount -t proc proc "$1/proc" && exec "$chroot" "$@"',
             "sh", shutil.which("chroot") or "/usr/sbin/chroot", str(root), *argv],
            env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"the chroot app exited:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in 60 s:\n{log.read_text()}"
            time.sleep(0.2)
        reply = httpx.post(f"{url}/v2/models/iris/infer", json=SETOSA, timeout=10)
        assert reply.status_code == 200, reply.text
        outputs = {o["name"]: o for o in reply.json()["outputs"]}
        assert outputs["label"]["data"] == [0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_iris_closure_contents(iris: tuple[Closure, Path]) -> None:
    closure, model = iris
    paths = {e.path: e for e in closure.entries}
    assert paths[str(model)].kind == "data"
    assert [os.path.basename(e.path) for e in closure.executables()] == [
        os.path.basename(os.path.realpath(closure.interpreter))]
    packages = {row.package for row in closure.by_package()}
    assert {"numpy", "onnxruntime", "orjson", "uniframe", "python", "python-stdlib",
            "system"} <= packages
    # Only the server ships: nothing of the builder, the CLI or the platform's libraries.
    for part in ("/uniframe/build/", "/uniframe/cli/", "/pydantic/", "/typer/", "/httpx/"):
        assert not [p for p in paths if part in p], part
    assert not [p for p in paths if p.startswith(("/proc/", "/sys/", "/dev/"))]
    assert not [p for p in paths if ".dist-info/" in p]  # the server reads no metadata
    assert not [p for p in closure.writes if p in paths]


def test_iris_tree_is_reproducible(iris: tuple[Closure, Path], tmp_path: Path) -> None:
    closure, _ = iris
    materialize(closure, tmp_path / "one")
    materialize(closure, tmp_path / "two")
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")
