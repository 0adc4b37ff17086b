"""An app for the guest init's end-to-end tests; ``argv[1]`` picks what it does.

It prints ``guestapp: ...`` lines the tests look for. It lives in its own
directory, which the tests put on the init's ``sys.path``.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PY = sys.executable


def say(text: str) -> None:
    print(f"guestapp: {text}", flush=True)


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()[0].decode()


def orphan() -> None:
    """Leave an orphan behind that exits soon, and watch the init reap its zombie."""
    child = ("import subprocess, sys; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.3)']); "
             "print(p.pid)")
    pid = int(subprocess.run([PY, "-c", child], capture_output=True, text=True, check=True).stdout)
    seen_zombie = False
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        state = _state(pid)
        if state is None:
            break
        seen_zombie = seen_zombie or state == "Z"
        time.sleep(0.02)
    if seen_zombie:
        say(f"orphan {pid} was a zombie")
    say(f"orphan {pid} {'reaped' if _state(pid) is None else 'NOT reaped'}")


def subprocess_statuses(grace: float) -> None:
    """The app's own children keep their exit statuses although the init reaps."""
    codes = [subprocess.run([PY, "-c", "raise SystemExit(7)"]).returncode for _ in range(10)]
    late = subprocess.Popen([PY, "-c", "raise SystemExit(5)"])
    time.sleep(grace / 2)  # exited a while ago, not waited for yet (but for less than the grace)
    codes.append(late.wait())
    say(f"subprocess statuses {codes}")


def machine() -> None:
    say(f"hostname {socket.gethostname()}")
    with socket.create_server(("127.0.0.1", 0)) as srv, \
            socket.create_connection(srv.getsockname(), timeout=5):
        say("loopback works")
    say(f"localhost is {socket.gethostbyname('localhost')}")  # glibc reads /etc/hosts
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, target, fstype, options = line.split()[:4]
        if target == "/":
            say(f"root {fstype} {options.split(',')[0]}")


def wait_for_stop(ready: str) -> None:
    Path(ready).write_text("ready")
    time.sleep(120)
    say("slept to the end (no stop arrived)")


def main(argv: list[str]) -> int:
    mode = argv[1]
    say(f"pid {os.getpid()} argv {json.dumps(argv[1:])} env {os.environ.get('GUESTAPP_GREETING')!r}")
    if mode == "exit3":
        grace = float(argv[2])
        orphan()
        subprocess_statuses(grace)
        if len(argv) > 3 and argv[3] == "machine":
            machine()
        return 3
    if mode == "fork":
        # A forked child that returns from main() falls back into the init's code.
        pid = os.fork()
        if pid == 0:
            return 4
        say(f"forked child exited with {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}")
        return 0
    if mode == "crash":
        raise RuntimeError("boom")
    if mode == "sleep":
        wait_for_stop(argv[2])
        return 0
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        wait_for_stop(argv[2])
        return 0
    if mode == "own-handler":
        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
        Path(argv[2]).write_text("ready")
        stopping.wait(120)
        say("drained")
        return 0
    if mode == "threads":
        atexit.register(say, "atexit ran")
        def late() -> None:
            time.sleep(0.5)
            say("thread finished")

        threading.Thread(target=late).start()
        # A pool the app forgot to shut down must not hold the exit up.
        pool = concurrent.futures.ThreadPoolExecutor(2)
        pool.submit(time.sleep, 0.1)
        pool.submit(time.sleep, 0.1)
        sys.modules["guestapp_pool"] = pool  # type: ignore[assignment]  # kept alive, as by an app global
        return 0
    raise SystemExit(f"guestapp: unknown mode {mode!r}")


def dump_modules(path: str) -> None:
    """For the VM test's hand-made closure: every module file this run loaded."""
    files = sorted({f for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))})
    Path(path).write_text(json.dumps(files))


if __name__ == "__main__":
    try:
        status = main(sys.argv)
    finally:
        if trace := os.environ.get("GUESTAPP_TRACE"):
            dump_modules(trace)
    sys.exit(status)
