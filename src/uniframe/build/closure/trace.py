"""Run an app once under the tracer and return its closure.

The app runs as a child process (``python -m uniframe.build.closure._tracer
OUT -- MODULE ARGS``) in its own process group, so a hung or forking app is
killed whole. This side drives it: it polls the readiness URL, sends the
warm-up requests (one real inference makes lazily loaded files show up),
then tells the tracer through a pipe to write what it saw. Doing the HTTP
here rather than in the traced interpreter keeps ``http.client``, ``socket``
and friends out of the app's trace unless the app itself uses them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from uniframe.build.closure.model import Closure
from uniframe.build.closure.resolve import TraceRecord, resolve
from uniframe.errors import BuildError

TRACER_MODULE = "uniframe.build.closure._tracer"
_TAIL_LINES = 30


@dataclass(frozen=True)
class WarmupRequest:
    """One HTTP request sent after readiness, whose answer must have ``expect_status``."""

    method: str
    path: str
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    expect_status: int = 200


def trace(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    ready_url: str | None,
    warmup: Sequence[WarmupRequest] | None = None,
    timeout: float = 120.0,
    extra_imports: Sequence[str] = (),
    extra_files: Sequence[Path] = (),
    python: str | None = None,
    cwd: Path | None = None,
) -> Closure:
    """Trace ``python -m argv[0] argv[1:]`` and return the files it needs.

    With ``ready_url`` the app is a server: the trace ends after the URL
    answered 200 and every ``warmup`` request got its expected status.
    Without it the trace ends when the app exits, which must be with code 0.
    ``extra_imports`` are imported before the app (modules the app needs only
    where it runs as PID 1); ``extra_files`` are added at their own paths.
    """
    run = run_tracer(
        argv, env=env, ready_url=ready_url, warmup=warmup or (), timeout=timeout,
        extra_imports=extra_imports, python=python, cwd=cwd,
    )
    return resolve(run.record, argv=argv, trace_seconds=run.seconds,
                   started_ns=run.started_ns, extra_files=extra_files)


@dataclass(frozen=True)
class TraceRun:
    record: TraceRecord
    seconds: float  # from starting the app to its record being written
    started_ns: int  # wall clock when the app started: files changed since are its output


def run_tracer(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    ready_url: str | None,
    warmup: Sequence[WarmupRequest],
    timeout: float,
    extra_imports: Sequence[str],
    python: str | None = None,
    cwd: Path | None = None,
) -> TraceRun:
    """Run the tracer and return its raw record and timing."""
    if not argv:
        raise BuildError("nothing to trace: give the app's module and its arguments")
    python = python or sys.executable
    shown = shlex.join([python, "-m", *argv])
    with tempfile.TemporaryDirectory(prefix="uniframe-trace-") as tmp:
        out = Path(tmp, "trace.json")
        log = Path(tmp, "app.log")
        read_end, write_end = os.pipe()
        cmd = [python, "-m", TRACER_MODULE, str(out), "--fd", str(read_end)]
        for name in extra_imports:
            cmd += ["--import", name]
        cmd += ["--", *argv]
        started_ns = time.time_ns()
        start = time.monotonic()
        deadline = start + timeout
        try:
            with log.open("wb") as log_file:
                proc = subprocess.Popen(
                    cmd, env=dict(env) if env is not None else None, cwd=cwd,
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    pass_fds=(read_end,), start_new_session=True,
                )
        except OSError as exc:
            os.close(write_end)
            raise BuildError(f"cannot start the trace of `{shown}`: {exc}") from None
        finally:
            os.close(read_end)
        try:
            if ready_url is not None:
                _wait_ready(proc, ready_url, deadline, shown, log)
                for request in warmup:
                    _warm(request, ready_url, deadline, shown, log)
                with contextlib.suppress(BrokenPipeError):  # it died: reported below
                    os.write(write_end, b"d")
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BuildError(
                f"tracing `{shown}` did not finish within {timeout:g} s.{_tail(log)}\n"
                "Check that the app ends by itself (or give a readiness URL for a server), "
                "or raise the trace timeout."
            ) from None
        finally:
            os.close(write_end)
            _kill_group(proc)
        seconds = time.monotonic() - start
        if not out.exists():
            raise BuildError(
                f"tracing `{shown}` failed: the tracer exited with code {code} without a "
                f"record.{_tail(log)}\nCheck that `{shown}` runs on this host."
            )
        record = TraceRecord.from_dict(json.loads(out.read_text(encoding="utf-8")))
        if ready_url is None and record.exit_code != 0:
            raise BuildError(
                f"tracing `{shown}` failed: the app exited with code {record.exit_code}."
                f"{_tail(log)}\nCheck that `{shown}` succeeds on this host."
            )
    return TraceRun(record, seconds, started_ns)


def _tail(log: Path) -> str:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    if not lines:
        return " The app printed nothing."
    return "\nLast lines of the app's output:\n  " + "\n  ".join(lines[-_TAIL_LINES:])


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise BuildError(f"readiness URL {url!r} must be http://HOST:PORT/PATH")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    return conn, parts.path or "/"


def _wait_ready(
    proc: subprocess.Popen[bytes], url: str, deadline: float, shown: str, log: Path,
) -> None:
    while True:
        code = proc.poll()
        if code is not None:
            raise BuildError(
                f"tracing `{shown}` failed: the app exited with code {code} before {url} "
                f"answered 200.{_tail(log)}\nCheck that `{shown}` starts on this host "
                "and that its port is free."
            )
        conn, path = _connection(url, 2.0)
        try:
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise BuildError(
                f"tracing `{shown}` failed: {url} did not answer 200 in time.{_tail(log)}\n"
                "Check the readiness URL (host, port, path) matches what the app serves."
            )
        time.sleep(0.1)


def _warm(request: WarmupRequest, url: str, deadline: float, shown: str, log: Path) -> None:
    conn, _ = _connection(url, max(1.0, deadline - time.monotonic()))
    try:
        conn.request(request.method, request.path, body=request.body or None,
                     headers=dict(request.headers))
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise BuildError(
            f"tracing `{shown}`: warm-up {request.method} {request.path} failed: {exc}."
            f"{_tail(log)}"
        ) from None
    finally:
        conn.close()
    if response.status != request.expect_status:
        raise BuildError(
            f"tracing `{shown}`: warm-up {request.method} {request.path} answered "
            f"{response.status}, expected {request.expect_status}: "
            f"{body[:300].decode('utf-8', 'replace')}\n"
            "Check the warm-up request against the app's API."
        )
