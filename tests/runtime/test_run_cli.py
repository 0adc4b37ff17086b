"""``uniframe run`` in the foreground, and the errors users meet first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from runtime_helpers import GUEST_PORT, free_port, uniframe


def test_missing_image_says_how_to_get_one(state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIFRAME_DATA", str(tmp_path / "data"))
    result = uniframe("run", "nosuchimage:1")
    assert result.returncode == 2
    assert "no image 'nosuchimage:1'" in result.stderr
    assert "uniframe build" in result.stderr and "uniframe images" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_replica_lists_the_existing_ones(state_dir: Path) -> None:
    for command in (["stop", "nope"], ["logs", "nope"], ["rm", "nope"]):
        result = uniframe(*command)
        assert result.returncode == 2, command
        assert "no replica 'nope'" in result.stderr and "uniframe ps -a" in result.stderr


def test_bad_port_mapping_and_memory(state_dir: Path, dummy_image: Path) -> None:
    result = uniframe("run", str(dummy_image), "-p", "80")
    assert result.returncode == 2 and "use HOST:GUEST" in result.stderr
    result = uniframe("run", str(dummy_image), "--memory", "256Mb")
    assert result.returncode == 2 and "256Mi" in result.stderr


def test_qemu_missing_says_how_to_install(state_dir: Path, dummy_image: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIFRAME_QEMU", "/nonexistent/qemu-system-x86_64")
    result = uniframe("run", str(dummy_image), "-d", "--accel", "tcg")
    assert result.returncode == 2
    assert "apt-get install qemu-system-x86" in result.stderr


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_foreground_run_streams_console_and_ctrl_c_stops_gracefully(state_dir: Path, test_image: Path,
                                                                    sig: signal.Signals) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uniframe.cli.main", "run", str(test_image), "-p", f"{port}:{GUEST_PORT}",
         "--accel", "tcg", "--memory", "128Mi", "--name", "fg"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 90
    while b"UNIFRAME-TEST-READY" not in seen:
        assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
        seen += os.read(proc.stdout.fileno(), 4096)
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200

    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    seen += out
    assert proc.returncode == 0, err.decode()
    assert b"UNIFRAME-EXIT status=0" in seen
    assert b"stopping fg" in err
    assert "exited (0)" in uniframe("ps", "-a").stdout


@pytest.mark.qemu
@pytest.mark.slow
def test_foreground_run_exits_with_the_guest_status(state_dir: Path, test_image: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uniframe.cli.main", "run", str(test_image), "-p", f"{port}:{GUEST_PORT}",
         "--accel", "tcg", "--rm"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 90
    while proc.poll() is None:  # a request the guest took but answered too late still ends it
        assert time.monotonic() < deadline
        try:
            httpx.get(f"http://127.0.0.1:{port}/exit/5", timeout=5)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 5
    assert b"UNIFRAME-EXIT status=5" in out
    assert uniframe("ps", "-a", "-o", "json").stdout.strip() == "[]"  # --rm removed it
