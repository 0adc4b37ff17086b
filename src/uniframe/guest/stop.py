"""Stopping the app gracefully, and for sure.

Three facts shape this module:

- The kernel drops signals PID 1 has no handler for, so a plain SIGTERM does
  nothing to a Python app that never called ``signal.signal(SIGTERM, ...)``.
  The init installs a handler that raises ``KeyboardInterrupt`` in the main
  thread (what Python apps already treat as "stop": ``http.server``, loops
  with ``try/except KeyboardInterrupt``). An app with its own SIGTERM handler
  (the model server drains on it) replaces ours and keeps its own behaviour.
- ``-M microvm,acpi=off`` has no power button, so the host cannot send an
  ACPI shutdown. Instead it types ``uniframe:shutdown`` on the serial
  console; a daemon thread reads the console and turns the line into SIGTERM
  for the main thread.
- A stop must end the VM even if the app ignores it: every stop request arms
  a watchdog that forces the exit ``stop_timeout`` seconds later. A SIGTERM
  that reaches an app which replaced our handler does not arm it (we never
  see it); in a microVM the console line is the only way a stop arrives, and
  that path always arms it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import termios
import threading
import time
from collections.abc import Callable
from types import FrameType

from uniframe.guest.reaper import block_stop_signals

SHUTDOWN_LINE = b"uniframe:shutdown"


class StopControl:
    """One place that knows whether a stop was asked for, why, and when to give up."""

    def __init__(self, timeout: float, on_timeout: Callable[[str], None]) -> None:
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._app_running = False
        self._interrupted = False
        self._main = threading.main_thread().ident

    def install(self) -> None:
        """Route SIGTERM to the app's main thread as ``KeyboardInterrupt``; call from it."""
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def app_started(self) -> None:
        """Mark the app as running; a stop requested during boot interrupts it at once."""
        self._app_running = True
        if self.reason is not None and not self._interrupted:
            self._interrupted = True
            raise KeyboardInterrupt

    def app_finished(self) -> None:
        self._app_running = False

    def request(self, reason: str) -> None:
        """Ask the app to stop (from any thread): arm the watchdog, signal the main thread."""
        self.arm(reason)
        if self._main is not None:
            signal.pthread_kill(self._main, signal.SIGTERM)

    def arm(self, reason: str) -> bool:
        """Start the watchdog once; True if this call armed it."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason = reason
        threading.Thread(target=self._watchdog, args=(reason,), name="uniframe-watchdog",
                         daemon=True).start()
        return True

    def _watchdog(self, reason: str) -> None:
        block_stop_signals()
        time.sleep(self.timeout)
        self.on_timeout(reason)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.arm("SIGTERM")
        # Interrupt the app once; a second SIGTERM must not break its cleanup.
        if self._app_running and not self._interrupted:
            self._interrupted = True
            raise KeyboardInterrupt


def watch_console(path: str, on_shutdown: Callable[[], None],
                  warn: Callable[[str], None],
                  on_line: Callable[[bytes], None] | None = None) -> threading.Thread:
    """Read ``path`` line by line in a daemon thread; call ``on_shutdown`` on the shutdown line.

    Every other complete line goes to ``on_line`` (the host's clone message,
    :mod:`.clone`).
    """
    thread = threading.Thread(target=_read_console, args=(path, on_shutdown, warn, on_line),
                              name="uniframe-console", daemon=True)
    thread.start()
    return thread


def _no_echo(fd: int) -> None:
    """Stop the tty echoing what the host types (a clone's seed) into the console log."""
    with contextlib.suppress(OSError, termios.error):
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~(termios.ECHO | termios.ECHONL)
        termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _read_console(path: str, on_shutdown: Callable[[], None],
                  warn: Callable[[str], None],
                  on_line: Callable[[bytes], None] | None = None) -> None:
    block_stop_signals()
    while True:
        try:
            # O_NOCTTY: PID 1 must not make the console its controlling tty
            # (the tty's ^C would then signal it behind the app's back).
            fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
        except OSError as exc:
            warn(f"cannot read {path} for shutdown requests ({exc.strerror}); "
                 f"'{SHUTDOWN_LINE.decode()}' will not work")
            return
        if os.isatty(fd):
            _no_echo(fd)
        pending = b""
        try:
            while chunk := os.read(fd, 4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip() == SHUTDOWN_LINE:
                        on_shutdown()
                    elif on_line is not None:
                        on_line(line)
                pending = pending[-4096:]
        except OSError as exc:
            warn(f"reading {path} failed ({exc.strerror}); reopening it")
        finally:
            os.close(fd)
        time.sleep(0.2)  # EOF (a FIFO's writer left, a tty hung up): reopen, gently
