"""Helpers for the guest init's tests: namespaces, the test app, console FIFOs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import uniframe

APPS = Path(__file__).parent / "apps"
SRC = Path(uniframe.__file__).resolve().parent.parent


def in_namespaces(flags: list[str], code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` under ``unshare FLAGS`` (root), so it cannot touch the host's state."""
    if os.geteuid() != 0:
        pytest.skip("needs root for namespaces")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(["unshare", *flags, sys.executable, "-c", code], capture_output=True,
                          text=True, env=env, timeout=timeout)


def write_to_fifo(path: Path, data: bytes, timeout: float = 20) -> None:
    """Write once a reader has the FIFO open (the console thread opens it at init)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited early ({proc.returncode}):\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{path} did not appear:\n{out}\n{err}")
        time.sleep(0.05)
