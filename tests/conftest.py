"""Suite-wide guard: a test run leaves no process behind.

Replicas, endpoint proxies and daemons that tests start are named by paths
under this run's temporary directory. Fixtures must end them; one a fixture
forgot keeps a port, a CPU share and a socket after the run (and on CI,
disturbs the tests after it). So at the end of the session any process whose
command line still names the run's directory is reported, killed, and the
run fails: the leak is a defect of the test that started it, and its
directory name says which test that was.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest


def _left_behind(root: str) -> list[tuple[int, str]]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if root in argv:
            found.append((int(d.name), argv.strip()))
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or getattr(session.config, "workerinput", None) is not None:
        return
    try:
        root = str(factory.getbasetemp())
    except (OSError, ValueError):
        return
    left = _left_behind(root + "/")
    if not left:
        return
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    lines = "\n".join(f"  pid {pid}: {argv[:300]}" for pid, argv in left)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"processes left behind by the tests (killed now; fix the fixture that started them):\n{lines}"
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
