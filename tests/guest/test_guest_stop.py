"""Stop requests: SIGTERM to KeyboardInterrupt, the console line, the watchdog."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest_support import write_to_fifo

from uniframe.guest.stop import StopControl, watch_console


@pytest.fixture
def restore_sigterm() -> Iterator[None]:
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def test_sigterm_interrupts_the_app_once_and_arms_the_watchdog(restore_sigterm: None) -> None:
    timeouts: list[tuple[str, float]] = []
    started = time.monotonic()
    stop = StopControl(0.3, lambda reason: timeouts.append((reason, time.monotonic() - started)))
    stop.install()
    stop.app_started()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    assert stop.reason == "SIGTERM"
    os.kill(os.getpid(), signal.SIGTERM)  # a second one does not break the app's cleanup
    time.sleep(0.6)
    assert [r for r, _ in timeouts] == ["SIGTERM"]  # one watchdog, fired once
    assert timeouts[0][1] >= 0.3


def test_request_from_a_thread_reaches_a_blocked_main_thread(restore_sigterm: None) -> None:
    fired = threading.Event()
    stop = StopControl(0.2, lambda reason: fired.set())
    stop.install()
    stop.app_started()
    threading.Timer(0.2, stop.request, args=("console",)).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        threading.Event().wait(10)  # blocked in a lock wait, like an app in accept()
    assert time.monotonic() - started < 5
    assert stop.reason == "console"
    assert fired.wait(5)


def test_no_interrupt_once_the_app_has_finished(restore_sigterm: None) -> None:
    stop = StopControl(60, lambda reason: None)
    stop.install()
    stop.app_started()
    stop.app_finished()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert stop.reason == "SIGTERM"


def test_console_shutdown_line(tmp_path: Path) -> None:
    fifo = tmp_path / "console"
    os.mkfifo(fifo)
    calls: list[float] = []
    warnings: list[str] = []
    watch_console(str(fifo), lambda: calls.append(time.monotonic()), warnings.append)
    write_to_fifo(fifo, b"hello\nuniframe:shut")
    time.sleep(0.2)
    assert calls == []
    # the writer went away mid-line; a new writer's full line counts (the console is reopened)
    write_to_fifo(fifo, b"noise\r\nuniframe:shutdown\r\n")
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(calls) == 1
    write_to_fifo(fifo, b"  uniframe:shutdown  \n")
    deadline = time.monotonic() + 5
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(calls) == 2 and warnings == []


def test_unreadable_console_is_a_warning(tmp_path: Path) -> None:
    warnings: list[str] = []
    watch_console(str(tmp_path / "missing"), lambda: None, warnings.append).join(5)
    assert len(warnings) == 1 and "uniframe:shutdown' will not work" in warnings[0]


def test_a_stop_during_boot_interrupts_the_app_as_it_starts(restore_sigterm: None) -> None:
    stop = StopControl(60, lambda reason: None)
    stop.install()
    os.kill(os.getpid(), signal.SIGTERM)  # before the app runs: nothing to interrupt yet
    time.sleep(0.05)
    assert stop.reason == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
        stop.app_started()
