"""Tracing real processes: what lands in the closure, what stays out, how failures read."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from uniframe.build.closure.model import Closure
from uniframe.build.closure.resolve import TraceRecord, resolve
from uniframe.build.closure.trace import WarmupRequest, run_tracer, trace
from uniframe.errors import BuildError

STDLIB = os.path.dirname(os.__file__)

APP = """
import ctypes, json, os
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "data.txt")) as f:
    json.loads(f.read())
os.listdir(os.path.join(here, "somedir"))
with open(os.path.join(here, "out.log"), "w") as f:
    f.write("written")
ctypes.CDLL("libz.so.1")
import importlib.metadata
importlib.metadata.version("numpy")
"""


def _app(directory: Path, source: str, name: str = "tapp") -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return {**os.environ, "PYTHONPATH": str(directory)}


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Closure, Path]:
    app = tmp_path_factory.mktemp("app")
    env = _app(app, APP)
    (app / "data.txt").write_text('{"a": 1}')
    (app / "somedir").mkdir()
    (app / "extra.bin").write_bytes(b"\0" * 10)
    closure = trace(["tapp"], env=env, ready_url=None, timeout=60, extra_imports=["wave"],
                    extra_files=[app / "extra.bin"])
    return closure, app


def _paths(closure: Closure) -> dict[str, str]:
    return {e.path: e.kind for e in closure.entries}


def _walk_resolves(closure: Closure, path: str) -> str:
    """Resolve ``path`` using only closure entries, as the image's kernel would."""
    entries = {e.path: e for e in closure.entries}
    cur = "/"
    comps = [c for c in path.split("/") if c]
    hops = 0
    while comps:
        comp = comps.pop(0)
        nxt = os.path.join(cur, comp)
        assert nxt in entries, f"{nxt} (on the way to {path}) is not in the closure"
        entry = entries[nxt]
        if entry.kind == "symlink":
            hops += 1
            assert hops < 40 and entry.target is not None
            base = entry.target if entry.target.startswith("/") else os.path.join(cur, entry.target)
            comps = [c for c in os.path.normpath(base).split("/") if c] + comps
            cur = "/"
        else:
            cur = nxt
    return cur


def test_app_reads_lists_imports_and_dlopens(traced: tuple[Closure, Path]) -> None:
    closure, app = traced
    kinds = _paths(closure)
    assert kinds[str(app / "tapp.py")] == "python-module"
    assert kinds[str(app / "data.txt")] == "data"
    assert kinds[str(app / "somedir")] == "dir"
    assert kinds[str(app / "extra.bin")] == "data"
    assert kinds[f"{STDLIB}/json/__init__.py"] == "python-module"
    assert kinds[f"{STDLIB}/wave.py"] == "python-module"  # extra_imports
    assert kinds[f"{STDLIB}/encodings/__init__.py"] == "python-module"  # loaded before the hook
    assert kinds[f"{STDLIB}/os.py"] == "python-module"  # frozen, but getpath's landmark
    metadata = [p for p in kinds if ".dist-info/" in p]
    assert metadata and all("/numpy-" in p for p in metadata)  # read, so kept; no other
    real_z = os.path.realpath("/lib/x86_64-linux-gnu/libz.so.1")
    assert kinds[real_z] == "shared-lib"
    assert _walk_resolves(closure, "/lib/x86_64-linux-gnu/libz.so.1") == real_z


def test_written_files_and_tracer_modules_stay_out(traced: tuple[Closure, Path]) -> None:
    closure, app = traced
    kinds = _paths(closure)
    assert str(app / "out.log") not in kinds
    assert str(app / "out.log") in closure.writes
    ours = [p for p in kinds if "/uniframe/" in p]
    assert ours == [], "the tracer's own package leaked into the closure"
    assert f"{STDLIB}/http/client.py" not in kinds  # the host does the HTTP, not the tracer
    assert not any(p.endswith(".pyc") for p in kinds), "host pycs are rebuilt, never copied"


def test_interpreter_loader_and_links_resolve_inside(traced: tuple[Closure, Path]) -> None:
    closure, _ = traced
    python = os.path.realpath(sys.executable)
    assert _walk_resolves(closure, sys.executable) == python
    assert [e.path for e in closure.executables()] == [python]
    loader = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
    assert _walk_resolves(closure, "/lib64/ld-linux-x86-64.so.2") == loader
    assert {e.path for e in closure.entries if e.kind == "loader"} == {loader}
    # Every symlink and every path in the closure resolves to a file or directory in it.
    for entry in closure.entries:
        final = _walk_resolves(closure, entry.path)
        assert final == os.path.realpath(entry.path)


def test_closure_json_round_trip(traced: tuple[Closure, Path]) -> None:
    closure, _ = traced
    assert Closure.from_json(closure.to_json()) == closure


def test_failing_app_reports_its_stderr(tmp_path: Path) -> None:
    env = _app(tmp_path, "raise SystemExit('the model file is corrupt')\n", "broken")
    with pytest.raises(BuildError) as err:
        trace(["broken"], env=env, ready_url=None, timeout=30)
    assert "exited with code 1" in str(err.value)
    assert "the model file is corrupt" in str(err.value)


def test_server_exiting_before_ready(tmp_path: Path) -> None:
    env = _app(tmp_path, "import sys; print('port taken', file=sys.stderr); sys.exit(2)\n", "srv")
    with pytest.raises(BuildError) as err:
        trace(["srv"], env=env, ready_url="http://127.0.0.1:9/ready", timeout=30)
    assert "exited with code 2 before" in str(err.value)
    assert "port taken" in str(err.value)


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    env = _app(tmp_path, f"""
        import subprocess, time
        child = subprocess.Popen(["sleep", "60"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        time.sleep(60)
    """, "hang")
    started = time.monotonic()
    with pytest.raises(BuildError) as err:
        trace(["hang"], env=env, ready_url=None, timeout=3)
    assert time.monotonic() - started < 15
    assert "did not finish within 3 s" in str(err.value)
    pid = int(pidfile.read_text())
    time.sleep(0.2)
    assert not _running(pid), "the app's child survived the trace"


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for PID 1, which may never reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_trace_waits_for_ready_and_warmup(tmp_path: Path) -> None:
    port = _free_port()
    env = _app(tmp_path, f"""
        import http.server, os
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers()
            def do_POST(self):
                n = int(self.headers["Content-Length"])
                body = self.rfile.read(n)
                if body == b"load":
                    open(os.path.join({str(tmp_path)!r}, "lazy.txt")).read()
                self.send_response(201 if body == b"load" else 400); self.end_headers()
            def log_message(self, *a): pass
        http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
    """, "web")
    (tmp_path / "lazy.txt").write_text("loaded on first request")
    url = f"http://127.0.0.1:{port}/ready"
    closure = trace(["web"], env=env, ready_url=url, timeout=60,
                    warmup=[WarmupRequest("POST", "/infer", b"load", expect_status=201)])
    assert str(tmp_path / "lazy.txt") in _paths(closure)
    assert f"{STDLIB}/http/server.py" in _paths(closure)  # the app's own import of http

    with pytest.raises(BuildError) as err:
        trace(["web"], env=env, ready_url=url, timeout=60,
              warmup=[WarmupRequest("POST", "/infer", b"nope", expect_status=201)])
    assert "answered 400, expected 201" in str(err.value)


def test_files_changed_during_the_run_are_output(tmp_path: Path) -> None:
    env = _app(tmp_path, "print('ok')\n", "quiet")
    run = run_tracer(["quiet"], env=env, ready_url=None, warmup=(), timeout=30, extra_imports=())
    before = tmp_path / "input.bin"
    before.write_bytes(b"x")
    os.utime(before, ns=(run.started_ns - 10**9, run.started_ns - 10**9))
    after = tmp_path / "telemetry.db"  # e.g. written by C code the hook cannot see
    after.write_bytes(b"y")
    raw = {**_raw(run.record), "maps": [str(before), str(after)]}
    closure = resolve(TraceRecord.from_dict(raw), started_ns=run.started_ns)
    assert str(before) in _paths(closure)
    assert str(after) not in _paths(closure)
    assert str(after) in closure.writes


def _raw(record: TraceRecord) -> dict[str, object]:
    prefix, base_prefix, exec_prefix, base_exec_prefix = record.prefixes
    return {
        "tracer": record.tracer, "executable": record.executable, "prefix": prefix,
        "base_prefix": base_prefix, "exec_prefix": exec_prefix,
        "base_exec_prefix": base_exec_prefix, "platlibdir": sys.platlibdir,
        "version": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "stdlib_dir": record.stdlib_dir, "cache_tag": record.cache_tag, "cwd": record.cwd,
        "path": list(record.path), "site_dirs": list(record.site_dirs),
        "modules": dict(record.modules),
    }
