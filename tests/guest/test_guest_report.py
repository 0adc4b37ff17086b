"""Exit reports: the status a shell would see, the human line, the host's marker."""

from __future__ import annotations

import pytest

from uniframe.guest.report import (
    ExitReport,
    app_report,
    forced_report,
    init_failure_report,
)


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


@pytest.mark.parametrize(("exc", "status", "reason", "last"), [
    (None, 0, "exited", "uniframe: app exited with status 0"),
    (SystemExit(), 0, "exited", "uniframe: app exited with status 0"),
    (SystemExit(3), 3, "exited", "uniframe: app exited with status 3"),
    (SystemExit(256 + 2), 2, "exited", "uniframe: app exited with status 2"),
    (SystemExit(-1), 255, "exited", "uniframe: app exited with status 255"),
    (SystemExit(True), 1, "exited", "uniframe: app exited with status 1"),
    (SystemExit("config missing"), 1, "exited", "uniframe: app exited with status 1"),
    (KeyboardInterrupt(), 130, "interrupted", "uniframe: app interrupted, status 130"),
    (ValueError("bad"), 1, "crashed", "uniframe: app exited with status 1"),
])
def test_app_reports(exc: BaseException | None, status: int, reason: str, last: str) -> None:
    report = app_report(raised(exc) if exc is not None else None)
    assert (report.status, report.reason, report.lines[-1]) == (status, reason, last)
    assert report.marker == f"UNIFRAME-EXIT status={status} reason={reason}"
    assert report.text().endswith(f"{last}\n{report.marker}\n")


def test_crash_shows_the_traceback_then_the_summary() -> None:
    report = app_report(raised(ValueError("bad value")))
    text = report.text()
    assert text.startswith("Traceback (most recent call last):\n")
    assert 'in raised\n    raise exc\nValueError: bad value\n' in text
    assert "uniframe: app crashed: ValueError: bad value\n" in text
    assert app_report(raised(RuntimeError())).lines[-2] == "uniframe: app crashed: RuntimeError"


def test_sys_exit_message_is_printed() -> None:
    assert app_report(raised(SystemExit("config missing"))).lines[0] == "config missing"


def test_stop_requests_are_not_crashes() -> None:
    report = app_report(raised(KeyboardInterrupt()), stop_reason="console")
    assert report == ExitReport(130, "interrupted", (
        "uniframe: app stopped on request (console): KeyboardInterrupt not handled, status 130",))


def test_forced_and_init_failure() -> None:
    assert forced_report(2.0, "SIGTERM").marker == "UNIFRAME-EXIT status=137 reason=killed"
    assert "did not stop within 2s of the stop request (SIGTERM)" in forced_report(2.0, "SIGTERM").lines[0]
    failed = init_failure_report(raised(OSError(2, "No such file or directory")), "mounting filesystems")
    assert failed.marker == "UNIFRAME-EXIT status=255 reason=init-failed"
    assert failed.lines[-2] == ("uniframe: init failed while mounting filesystems: "
                                "FileNotFoundError: [Errno 2] No such file or directory")
