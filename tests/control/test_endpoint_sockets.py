"""Endpoint control sockets: private from their first instant, never in /tmp, strays pinned by pidfd.

Whoever connects to an endpoint's control socket can re-route a service's
traffic, and the daemon that owns it runs as root. These tests start real
endpoint processes and look at what they leave on disk and in /proc.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uniframe.control.endpoints import Endpoints, _kill_if_still
from uniframe.control.proxy import Endpoint
from uniframe.control.proxy.unixsock import UnixSocketError, bind_private, socket_path
from uniframe.control.store import Store
from uniframe.runtime.process import ProcessRef


def test_control_socket_is_0600_in_a_0700_directory_under_the_state_dir(tmp_path: Path) -> None:
    root = tmp_path / "st" / "endpoints"
    with Store.open(str(tmp_path / "state.db")) as store:
        endpoints = Endpoints(store, root)
        ep = endpoints.ensure("svc")
        try:
            path = endpoints.control_path("svc")
            assert path == root / "svc.sock"
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
        finally:
            endpoints.remove("svc")
            ep.close()


def test_a_long_state_dir_never_falls_back_to_tmp(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 15)
    name = "a-service-name-that-is-long-" * 2 + ".sock"
    short = socket_path(deep, name)
    assert short.parent == deep and short.name.endswith(".sock") and len(str(short)) <= 107
    with pytest.raises(UnixSocketError, match="set UNIFRAME_STATE to a shorter path"):
        socket_path(tmp_path / ("x" * 120), "svc.sock")


def test_bind_private_refuses_a_directory_owned_by_someone_else(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 65534, 65534)
    with pytest.raises(UnixSocketError, match="belongs to uid 65534"):
        bind_private(other / "x.sock", 1)
    taken = tmp_path / "mine" / "x.sock"
    first = bind_private(taken, 1)
    try:
        with pytest.raises(UnixSocketError, match="already listens"):
            bind_private(taken, 1)
    finally:
        first.close()


def test_strays_are_killed_only_if_pid_and_start_time_still_match(tmp_path: Path) -> None:
    control = tmp_path / "st" / "endpoints" / "svc.sock"
    ep = Endpoint.start("svc", control_path=control)
    pid = ep.pid
    assert pid is not None
    ep.close()  # the daemon lost its handle: a stray as far as it knows
    ref = ProcessRef.of(pid)
    marker = str(control).encode()
    # the same PID with another start time is another process: it must survive
    _kill_if_still(ProcessRef(pid, ref.start_time + 1), b"--control", marker)
    time.sleep(0.2)
    assert ref.alive()
    # the right process but a command line that no longer matches: survives too
    _kill_if_still(ref, b"--control", b"/elsewhere.sock")
    time.sleep(0.2)
    assert ref.alive()
    _kill_if_still(ref, b"--control", marker)
    deadline = time.monotonic() + 10
    while ref.alive() and time.monotonic() < deadline:
        ref.reap()
        time.sleep(0.05)
    assert not ref.alive()


def test_a_live_unrelated_process_is_never_signalled(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _kill_if_still(ProcessRef.of(proc.pid), b"--control", b"/x.sock")
        time.sleep(0.2)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
