"""How the app ended, said once for people and once for the host.

The serial console is the only thing that outlives a unikernel, so the init
ends every run with a human line (``uniframe: app exited with status 3``,
with the traceback before it for a crash) and one marker line the host
parses::

    UNIFRAME-EXIT status=<0-255> reason=<exited|crashed|interrupted|killed|init-failed>

``status`` follows what a shell would see from ``python -m app``: the
``sys.exit`` code, 1 for an uncaught exception, 130 for an uncaught
``KeyboardInterrupt``; the init adds 137 (the app ignored a stop request and
was forced) and 255 (the init itself failed).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

MARKER = "UNIFRAME-EXIT"
EXITED = "exited"
CRASHED = "crashed"
INTERRUPTED = "interrupted"
KILLED = "killed"
INIT_FAILED = "init-failed"

STATUS_INTERRUPTED = 130
STATUS_KILLED = 137
STATUS_INIT_FAILED = 255


@dataclass(frozen=True)
class ExitReport:
    status: int
    reason: str
    lines: tuple[str, ...]  # for people, traceback included

    @property
    def marker(self) -> str:
        return f"{MARKER} status={self.status} reason={self.reason}"

    def text(self) -> str:
        return "\n".join((*self.lines, self.marker)) + "\n"


def _exit_code(code: object) -> tuple[int, tuple[str, ...]]:
    """``SystemExit.code`` -> (status, lines), as CPython's own exit handling does."""
    if code is None:
        return 0, ()
    if isinstance(code, int):
        return code & 0xFF, ()
    return 1, (str(code),)  # sys.exit("message") prints it and exits 1


def app_report(exc: BaseException | None, stop_reason: str | None = None) -> ExitReport:
    """The report for an app that returned (``exc`` None) or raised ``exc``."""
    if exc is None:
        return ExitReport(0, EXITED, ("uniframe: app exited with status 0",))
    if isinstance(exc, SystemExit):
        status, lines = _exit_code(exc.code)
        return ExitReport(status, EXITED, (*lines, f"uniframe: app exited with status {status}"))
    if isinstance(exc, KeyboardInterrupt):
        if stop_reason is not None:
            return ExitReport(STATUS_INTERRUPTED, INTERRUPTED, (
                f"uniframe: app stopped on request ({stop_reason}): KeyboardInterrupt "
                f"not handled, status {STATUS_INTERRUPTED}",))
        return ExitReport(STATUS_INTERRUPTED, INTERRUPTED, (
            *_traceback(exc), f"uniframe: app interrupted, status {STATUS_INTERRUPTED}"))
    return ExitReport(1, CRASHED, (
        *_traceback(exc), f"uniframe: app crashed: {_describe(exc)}",
        "uniframe: app exited with status 1"))


def forced_report(timeout: float, stop_reason: str) -> ExitReport:
    return ExitReport(STATUS_KILLED, KILLED, (
        f"uniframe: app did not stop within {timeout:g}s of the stop request ({stop_reason}); "
        f"forcing the exit, status {STATUS_KILLED}",))


def init_failure_report(exc: BaseException, step: str) -> ExitReport:
    return ExitReport(STATUS_INIT_FAILED, INIT_FAILED, (
        *_traceback(exc), f"uniframe: init failed while {step}: {_describe(exc)}",
        f"uniframe: the app was not run, status {STATUS_INIT_FAILED}"))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _traceback(exc: BaseException) -> tuple[str, ...]:
    return tuple("".join(traceback.format_exception(exc)).rstrip("\n").split("\n"))
