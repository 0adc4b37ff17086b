"""The init end to end, as a real process: as a plain process, and as PID 1 of a PID namespace.

The PID-1 runs boot the ``/init`` script exactly as the image builder writes
it (``#!python -IBS``, explicit ``sys.path``) inside ``unshare --pid --fork
--mount-proc --uts --net``, with the test's command line bind-mounted over
``/proc/cmdline``; the init's ``reboot(2)`` then ends the namespace (its
parent sees SIGHUP), which is what a reboot of the microVM looks like from
here.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from guest_support import APPS, SRC, wait_for_file, write_to_fifo

from uniframe.guest.cmdline import encode_cmdline
from uniframe.guest.initscript import render_init_script

MARKER = re.compile(r"^UNIFRAME-EXIT status=(\d+) reason=(\S+)$", re.M)


def marker(output: str) -> tuple[int, str]:
    found = MARKER.findall(output)
    assert len(found) == 1, output
    assert output.rstrip().endswith(f"UNIFRAME-EXIT status={found[0][0]} reason={found[0][1]}"), \
        "the marker must be the last thing the init prints"
    return int(found[0][0]), found[0][1]


def start_process(tmp_path: Path, cmdline: str) -> subprocess.Popen[str]:
    """The init as an ordinary process (not PID 1): no mounts, no reboot, exit(status)."""
    (tmp_path / "cmdline").write_text(f"console=ttyS0 {cmdline}\n")
    code = f"from uniframe.guest.init import main; main({str(tmp_path / 'cmdline')!r})"
    env = {**os.environ, "PYTHONPATH": f"{SRC}:{APPS}"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)


def run_process(tmp_path: Path, cmdline: str, timeout: float = 60) -> tuple[int, str]:
    proc = start_process(tmp_path, cmdline)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_app_exit_status_orphans_and_subprocess(tmp_path: Path) -> None:
    line = encode_cmdline("guestapp", ["exit3", "1.0"], {"GUESTAPP_GREETING": 'hi "there" = x'},
                          reap_grace=1.0, console="none")
    code, out = run_process(tmp_path, line)
    assert code == 3, out
    assert re.search(r"""guestapp: pid \d+ argv \["exit3", "1.0"\] env 'hi "there" = x'\n""", out)
    assert "guestapp: pid 1 " not in out
    assert re.search(r"guestapp: orphan \d+ was a zombie\n", out), out
    assert re.search(r"guestapp: orphan \d+ reaped\n", out), out
    assert "guestapp: subprocess statuses [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 5]" in out
    assert "uniframe: app exited with status 3\n" in out
    assert re.search(r"uniframe: init ready in \d+ ms; running guestapp exit3 1.0\n", out)
    assert marker(out) == (3, "exited")


def test_crash_is_reported_with_traceback(tmp_path: Path) -> None:
    code, out = run_process(tmp_path, encode_cmdline("guestapp", ["crash"], console="none"))
    assert code == 1
    assert 'raise RuntimeError("boom")\nRuntimeError: boom\n' in out
    assert "uniframe: app crashed: RuntimeError: boom\n" in out
    assert marker(out) == (1, "crashed")


def test_missing_app_module(tmp_path: Path) -> None:
    code, out = run_process(tmp_path, encode_cmdline("no_such_app", console="none"))
    assert code == 1
    assert "uniframe: app crashed: ImportError: No module named no_such_app" in out
    assert marker(out) == (1, "crashed")


def test_bad_command_line_is_an_init_failure(tmp_path: Path) -> None:
    code, out = run_process(tmp_path, "uniframe.port=eighty")
    assert code == 255
    assert ("uniframe: init failed while reading the configuration from "
            f"{tmp_path}/cmdline: CmdlineError: uniframe.port='eighty': expected a TCP port") in out
    assert marker(out) == (255, "init-failed")


def test_threads_and_atexit_run_before_the_exit(tmp_path: Path) -> None:
    started = time.monotonic()
    code, out = run_process(tmp_path, encode_cmdline("guestapp", ["threads"], console="none"))
    assert time.monotonic() - started < 8, "an idle thread pool held the exit up to stop_timeout"
    assert code == 0
    reported = out.index("uniframe: app exited with status 0")
    assert reported < out.index("guestapp: thread finished") < out.index("guestapp: atexit ran")
    assert marker(out) == (0, "exited")


def test_a_forked_child_falling_back_into_the_init_just_exits(tmp_path: Path) -> None:
    code, out = run_process(tmp_path, encode_cmdline("guestapp", ["fork"], console="none"))
    assert code == 0
    assert "guestapp: forked child exited with 4\n" in out
    assert "status 4" not in out
    assert marker(out) == (0, "exited")


def test_sigterm_stops_an_app_without_a_handler(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = start_process(tmp_path, encode_cmdline("guestapp", ["sleep", str(ready)], console="none"))
    wait_for_file(ready, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "uniframe: app stopped on request (SIGTERM): KeyboardInterrupt not handled" in out
    assert marker(out) == (130, "interrupted")


def test_console_shutdown_reaches_the_apps_own_handler(tmp_path: Path) -> None:
    console = tmp_path / "console"
    os.mkfifo(console)
    ready = tmp_path / "ready"
    proc = start_process(tmp_path, encode_cmdline("guestapp", ["own-handler", str(ready)],
                                                  console=str(console)))
    wait_for_file(ready, proc)
    write_to_fifo(console, b"uniframe:shutdown\n")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "guestapp: drained" in out
    assert marker(out) == (0, "exited")


def test_watchdog_forces_an_app_that_ignores_the_stop(tmp_path: Path) -> None:
    console = tmp_path / "console"
    os.mkfifo(console)
    ready = tmp_path / "ready"
    proc = start_process(tmp_path, encode_cmdline("guestapp", ["ignore-term", str(ready)],
                                                  console=str(console), stop_timeout=1))
    wait_for_file(ready, proc)
    write_to_fifo(console, b"uniframe:shutdown\n")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 137
    assert "uniframe: app did not stop within 1s of the stop request (console)" in out
    assert "slept to the end" not in out
    assert marker(out) == (137, "killed")


# --- as PID 1 -------------------------------------------------------------------------------


def boot_in_namespace(tmp_path: Path, cmdline: str) -> subprocess.Popen[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root for PID, mount, UTS and network namespaces")
    init = tmp_path / "init"
    stdlib = [p for p in sys.path if p.startswith(sys.base_prefix) and "site-packages" not in p]
    init.write_text(render_init_script(sys.executable, [*stdlib, str(SRC), str(APPS)]))
    init.chmod(0o755)
    (tmp_path / "cmdline").write_text(f"console=ttyS0 reboot=t panic=-1 {cmdline}\n")
    boot = f"mount --bind {tmp_path / 'cmdline'} /proc/cmdline && exec {init}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--uts", "--net",
                             "sh", "-c", boot], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd="/")


@pytest.mark.root
def test_pid1_runs_the_app_reaps_orphans_and_reboots(tmp_path: Path) -> None:
    line = encode_cmdline("guestapp", ["exit3", "1.0", "machine"], {"GUESTAPP_GREETING": "hi"},
                          hostname="guest-1", reap_grace=1.0, console="none")
    hostname = os.uname().nodename
    proc = boot_in_namespace(tmp_path, line)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == -signal.SIGHUP, f"reboot(2) did not end the namespace:\n{out}"
    assert """guestapp: pid 1 argv ["exit3", "1.0", "machine"] env 'hi'""" in out
    assert re.search(r"guestapp: orphan \d+ was a zombie\n", out), out
    assert re.search(r"guestapp: orphan \d+ reaped\n", out), out
    assert "guestapp: subprocess statuses [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 5]" in out
    assert "guestapp: hostname guest-1\nguestapp: loopback works\n" in out
    assert re.search(r"uniframe: init ready in \d+ ms, [\d.]+ s after boot; "
                     r"running guestapp exit3 1.0 machine\n", out)
    assert "uniframe: app exited with status 3\n" in out
    assert marker(out) == (3, "exited")
    assert os.uname().nodename == hostname


@pytest.mark.root
def test_pid1_console_shutdown(tmp_path: Path) -> None:
    console = tmp_path / "console"
    os.mkfifo(console)
    ready = tmp_path / "ready"
    proc = boot_in_namespace(tmp_path, encode_cmdline("guestapp", ["sleep", str(ready)],
                                                      console=str(console), stop_timeout=5))
    wait_for_file(ready, proc)
    write_to_fifo(console, b"uniframe:shutdown\n")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGHUP, out
    assert "uniframe: app stopped on request (console)" in out
    assert marker(out) == (130, "interrupted")
