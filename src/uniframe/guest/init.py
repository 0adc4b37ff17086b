"""PID 1 of a uniframe unikernel: prepare the machine, run the app in this very process, end the VM.

A unikernel has no init system, no shell and one program. The kernel runs
``/init``, a ``#!`` script for the image's Python (see
:mod:`uniframe.guest.initscript`), which calls :func:`main`. ``main`` does in
order what a distribution's init, udev and shutdown scripts would:

1. mount ``/proc``, ``/sys``, ``/dev``, ``/dev/shm``, ``/tmp``, ``/run``
   (:mod:`.mounts`);
2. read ``uniframe.*`` keys from ``/proc/cmdline`` (:mod:`.cmdline`);
3. set the hostname, bring ``lo`` up, write ``/etc/hosts`` if the image has
   none (:mod:`.net`; an image with a read-only root ships its own);
4. warn if the kernel's random generator is not ready (:mod:`.entropy`);
5. start the zombie reaper (:mod:`.reaper`), route SIGTERM and the console's
   ``uniframe:shutdown`` line to a graceful stop with a watchdog (:mod:`.stop`),
   and the console's ``uniframe:clone`` line (a restored snapshot clone's
   entropy, clock and identity) to :mod:`.clone`;
6. run the app module as ``__main__`` with ``runpy``, in this process, so the
   app is PID 1 and nothing sits between it and the kernel;
7. report how it ended (:mod:`.report`), ``sync``, and ``reboot(2)``: with
   ``reboot=t`` on the kernel command line and QEMU's ``-no-reboot``, QEMU
   exits. A kernel without ACPI cannot power off, and PID 1 must never just
   return (the kernel panics on a dead init).

Any failure of the init itself is reported the same way and also ends in a
reboot: a unikernel must never be left hung.

Outside a VM (``os.getpid() != 1``: tests, or running the same entry point as
a plain process) steps 1, 3 and the reboot are skipped, the process becomes a
child subreaper so orphans still come to it, and it ends with ``_exit(status)``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import runpy
import sys
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

from uniframe.guest import clone, entropy, libc, mounts, net
from uniframe.guest.cmdline import GuestConfig, parse_cmdline
from uniframe.guest.reaper import Reaper
from uniframe.guest.report import ExitReport, app_report, forced_report, init_failure_report
from uniframe.guest.stop import StopControl, watch_console

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def say(line: str) -> None:
    _write(f"uniframe: {line}\n")


def _write(text: str) -> None:
    """Write to the console after the app's own buffered output; never raises.

    A broken console must not stop the shutdown, and the write goes straight
    to fd 2 so it works even when ``sys.stderr`` was replaced or closed.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    with contextlib.suppress(OSError):
        os.write(2, text.encode(errors="replace"))


class Finisher:
    """Ends the run exactly once, from whichever thread gets there first."""

    def __init__(self, machine: bool) -> None:
        self.machine = machine
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._announced: ExitReport | None = None

    def in_forked_child(self) -> bool:
        """True in a child the app forked that has fallen back into the init's code."""
        return os.getpid() != self.pid

    def announce(self, report: ExitReport) -> None:
        """Say how the app ended now, before waiting for its threads; the marker comes last."""
        self._announced = report
        _write("".join(f"{line}\n" for line in report.lines))

    def finish(self, report: ExitReport) -> NoReturn:
        if self.in_forked_child():
            # Exit like the plain Python process it is: no report, and above all no reboot.
            _write("")
            os._exit(report.status)
        self._lock.acquire()  # never released: the first caller ends the process
        if report is self._announced:
            _write(f"{report.marker}\n")
        else:
            _write(report.text())
        if self.machine:
            os.sync()
            try:
                libc.reboot(libc.RB_AUTOBOOT)
            except OSError as exc:
                say(f"reboot failed ({exc}); exiting PID 1 instead (the kernel panics, "
                    "and reboots with panic=-1)")
        os._exit(report.status)


def run_app(module: str, args: Sequence[str], stop: StopControl | None = None) -> BaseException | None:
    """Run ``module`` as ``__main__`` with ``sys.argv``; return what it raised, if anything.

    ``stop`` learns when the app runs inside the ``try``, so a stop request
    that arrived during boot, or arrives at any moment of the run, ends up in
    the app's report rather than in the init's.
    """
    sys.argv = [module, *args]
    try:
        if stop is not None:
            stop.app_started()
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except BaseException as exc:
        return exc
    finally:
        if stop is not None:
            stop.app_finished()
    return None


def main(cmdline_path: str = "/proc/cmdline") -> NoReturn:
    """Entry point of ``/init``; never returns."""
    started = time.monotonic()
    machine = os.getpid() == 1
    finisher = Finisher(machine)
    step = "starting"
    try:
        if machine:
            step = "mounting filesystems"
            _mount_all()
        else:
            step = "becoming a child subreaper"
            libc.set_child_subreaper()
        step = f"reading the configuration from {cmdline_path}"
        with open(cmdline_path, encoding="utf-8", errors="replace") as f:
            config = parse_cmdline(f.read())
        for key in config.unknown:
            say(f"warning: unknown kernel command line key {key} ignored")
        if machine:
            step = "setting up the network"
            _setup_network(config)
        if not entropy.crng_ready():
            say("warning: the kernel's random number generator is not ready; " + entropy.ADVICE)
        step = "starting the reaper"
        Reaper(config.reap_grace).start()
        step = "installing the stop handlers"
        stop = StopControl(config.stop_timeout, lambda reason: finisher.finish(
            forced_report(config.stop_timeout, reason)))
        stop.install()
        if config.console is not None:
            watch_console(config.console, lambda: stop.request("console"),
                          lambda msg: say(f"warning: {msg}"),
                          lambda line: on_console_line(line, machine))
        os.environ.update(config.app_env())
        os.environ.setdefault("PATH", DEFAULT_PATH)
        say(_ready_line(config, started, machine))
        step = "running the app"
        raised = run_app(config.app, config.args, stop)
        report = app_report(raised, stop.reason)
        del raised
        if finisher.in_forked_child():
            finisher.finish(report)
        finisher.announce(report)
        step = "waiting for the app's threads and exit handlers"
        _wind_down(config.stop_timeout)
    except BaseException as exc:
        finisher.finish(init_failure_report(exc, step))
    finisher.finish(report)


def on_console_line(line: bytes, machine: bool) -> None:
    """A console line other than the shutdown line: the host's clone message, or ignored."""
    if not clone.is_request(line):
        return
    try:
        ack = clone.apply(clone.parse(line), machine)
    except Exception as exc:  # the console thread must live on: it also carries the shutdown line
        # No acknowledgement: the host gives up on this clone and boots a replica instead.
        say(f"warning: cannot become a clone ({exc}); not acknowledging")
        return
    _write(f"{ack}\n")


def _mount_all() -> None:
    for result in mounts.mount_all():
        if result.outcome not in (mounts.MOUNTED, mounts.ALREADY):
            kept = f": {', '.join(result.kept)}" if result.kept else ""
            say(f"{result.target} ({result.fstype}): {result.outcome}{kept}")


def _setup_network(config: GuestConfig) -> None:
    """Best effort: a kernel without networking still runs an app that needs none."""
    try:
        net.set_hostname(config.hostname)
    except OSError as exc:
        say(f"warning: cannot set the hostname: {exc.strerror}")
    try:
        net.interface_up("lo")
    except OSError as exc:
        say(f"warning: cannot bring up the loopback interface: {exc.strerror}")
    if not os.path.exists(net.HOSTS_PATH):
        try:
            os.makedirs(os.path.dirname(net.HOSTS_PATH), exist_ok=True)
            with open(net.HOSTS_PATH, "w") as f:
                f.write(net.hosts_text(config.hostname))
        except OSError as exc:
            hint = ("; the root is read-only, so the image must ship it "
                    "(uniframe.guest.net.hosts_text)" if exc.errno == errno.EROFS else "")
            say(f"warning: cannot write {net.HOSTS_PATH}: {exc.strerror}{hint}")


def _ready_line(config: GuestConfig, started: float, machine: bool) -> str:
    took = f"init ready in {(time.monotonic() - started) * 1000:.0f} ms"
    if machine:
        try:
            with open("/proc/uptime") as f:
                took += f", {float(f.read().split()[0]):.2f} s after boot"
        except (OSError, ValueError, IndexError):
            pass
    argv = " ".join([config.app, *config.args])
    return f"{took}; running {argv}"


def _wind_down(timeout: float) -> None:
    """What the interpreter does at exit, since PID 1 never reaches the interpreter's exit.

    In ``threading._shutdown``'s order: the callbacks registered with
    ``threading._register_atexit`` (``concurrent.futures`` uses them to tell
    idle pool workers to quit), joining non-daemon threads, then the
    ``atexit`` handlers. Unlike the interpreter, stop waiting for threads after
    ``timeout``: a thread that never ends must not keep the VM up forever.
    These are private CPython hooks; ``getattr`` keeps a missing one harmless.
    """
    for callback in reversed(list(getattr(threading, "_threading_atexits", []))):
        try:
            callback()
        except Exception as exc:
            say(f"warning: a thread exit callback failed: {exc!r}")
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            say(f"warning: thread {thread.name!r} still runs {timeout:g}s after the app "
                "finished; not waiting for it")
    atexit._run_exitfuncs()
