"""The guest's configuration, carried on the kernel command line.

Why the command line: it is the one channel that reaches PID 1 of every
unikernel without a disk, a network or a metadata service, and the same image
can be booted with a different app, arguments or environment just by changing
QEMU's ``-append``. Everything here is standard library because the same
module runs on the host (to write the line) and in the guest (to read it).

Keys (all optional; ``uniframe.*`` keys contain a dot, so the kernel treats
them as module parameters and neither hands them to init's environment nor
complains; init reads them from ``/proc/cmdline``)::

    uniframe.app=MODULE          module run as ``__main__`` (default uniframe.serve)
    uniframe.args=B64            base64url (no padding) of a JSON list of strings: sys.argv[1:]
    uniframe.env=B64             base64url (no padding) of a JSON object of strings: os.environ
    uniframe.port=N              sets UNIFRAME_PORT for the app (the model server's listen port)
    uniframe.hostname=NAME       hostname (default uniframe)
    uniframe.stop_timeout=SEC    after a stop request, force the exit this long later (default 10)
    uniframe.reap_grace=SEC      a zombie child is reaped once it has been one this long (default 5)
    uniframe.console=PATH|none   where ``uniframe:shutdown`` is read from (default /dev/console)

Arguments and environment are JSON inside base64url so that spaces, quotes,
``=`` and non-ASCII survive the kernel's whitespace-and-quote tokenizer.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

PREFIX = "uniframe."
DEFAULT_APP = "uniframe.serve"
DEFAULT_HOSTNAME = "uniframe"
DEFAULT_CONSOLE = "/dev/console"
DEFAULT_STOP_TIMEOUT = 10.0
DEFAULT_REAP_GRACE = 5.0
# x86's COMMAND_LINE_SIZE; the kernel silently truncates a longer line.
COMMAND_LINE_SIZE = 2048

# What the guest needs from the kernel's own parameters (the runtime adds them):
# the console for reports, reboot=t so reboot(2) ends a microvm (no ACPI) and
# QEMU's -no-reboot then exits, panic=-1 so a dead PID 1 reboots at once instead
# of hanging, and random.trust_cpu=on so the CRNG is ready at boot when the CPU
# has RDRAND (-cpu max or host).
KERNEL_ARGS = ("console=ttyS0", "reboot=t", "panic=-1", "random.trust_cpu=on")

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$")
_KEYS = ("app", "args", "env", "port", "hostname", "stop_timeout", "reap_grace", "console")


class CmdlineError(ValueError):
    """A ``uniframe.*`` key is malformed; the message names the key and the fix."""


@dataclass(frozen=True)
class GuestConfig:
    """What PID 1 runs and how; the defaults are what an empty command line means."""

    app: str = DEFAULT_APP
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    port: int | None = None
    hostname: str = DEFAULT_HOSTNAME
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    reap_grace: float = DEFAULT_REAP_GRACE
    console: str | None = DEFAULT_CONSOLE
    unknown: tuple[str, ...] = ()  # unrecognised uniframe.* keys, reported as warnings

    def app_env(self) -> dict[str, str]:
        """The environment additions the app gets: ``uniframe.env`` plus the port."""
        env = dict(self.env)
        if self.port is not None:
            env["UNIFRAME_PORT"] = str(self.port)
        return env


def _b64(value: object) -> str:
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(key: str, text: str) -> object:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return json.loads(raw.decode())
    except (binascii.Error, ValueError) as exc:
        raise CmdlineError(
            f"{PREFIX}{key}: not base64url-encoded JSON ({exc}); "
            "write it with uniframe.guest.cmdline.encode_cmdline") from None


def _seconds(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise CmdlineError(f"{PREFIX}{key}={text!r}: expected a number of seconds >= 0")
    return value


def _check_app(app: str) -> str:
    if not _MODULE.match(app):
        raise CmdlineError(f"{PREFIX}app={app!r}: expected a dotted module name like uniframe.serve")
    return app


def _check_hostname(name: str) -> str:
    if not _HOSTNAME.match(name):
        raise CmdlineError(
            f"{PREFIX}hostname={name!r}: expected 1-63 letters, digits, '-' or '.'")
    return name


def _check_port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise CmdlineError(f"{PREFIX}port={text!r}: expected a TCP port 1-65535")
    return int(text)


def _check_console(path: str) -> str | None:
    if path == "none":
        return None
    if not path.startswith("/") or any(c.isspace() or c == '"' for c in path):
        raise CmdlineError(
            f"{PREFIX}console={path!r}: expected an absolute path without spaces, or 'none'")
    return path


def split_cmdline(text: str) -> list[str]:
    """Split like the kernel: on whitespace outside double quotes, stopping at ``--``.

    Quotes are removed from the words (the kernel strips them from values),
    and words after ``--`` are init's argv, not parameters.
    """
    words: list[str] = []
    word: list[str] = []
    in_quote = started = False
    for ch in text:
        if ch == '"':
            in_quote = not in_quote
            started = True
        elif ch.isspace() and not in_quote:
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(ch)
            started = True
    if started:
        words.append("".join(word))
    return words[:words.index("--")] if "--" in words else words


def parse_cmdline(text: str) -> GuestConfig:
    """Read the ``uniframe.*`` keys of a kernel command line; other words are ignored.

    A later key wins over an earlier one, as the runtime appends its own keys
    after the image's.
    """
    values: dict[str, str] = {}
    unknown: list[str] = []
    for word in split_cmdline(text):
        key, eq, value = word.partition("=")
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):]
        if name not in _KEYS:
            unknown.append(key)
        elif not eq:
            raise CmdlineError(f"{key}: missing '=VALUE'")
        else:
            values[name] = value

    args: object = _unb64("args", values["args"]) if "args" in values else []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise CmdlineError(f"{PREFIX}args: expected a JSON list of strings")
    env: object = _unb64("env", values["env"]) if "env" in values else {}
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise CmdlineError(f"{PREFIX}env: expected a JSON object of strings")

    return GuestConfig(
        app=_check_app(values.get("app", DEFAULT_APP)),
        args=tuple(args),
        env=env,
        port=_check_port(values["port"]) if "port" in values else None,
        hostname=_check_hostname(values.get("hostname", DEFAULT_HOSTNAME)),
        stop_timeout=_seconds("stop_timeout", values.get("stop_timeout", str(DEFAULT_STOP_TIMEOUT))),
        reap_grace=_seconds("reap_grace", values.get("reap_grace", str(DEFAULT_REAP_GRACE))),
        console=_check_console(values.get("console", DEFAULT_CONSOLE)),
        unknown=tuple(unknown),
    )


def encode_cmdline(
    app: str = DEFAULT_APP,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    port: int | None = None,
    hostname: str | None = None,
    stop_timeout: float | None = None,
    reap_grace: float | None = None,
    console: str | None = None,
) -> str:
    """The ``uniframe.*`` words for QEMU's ``-append`` (the host adds the kernel's own).

    Raises :class:`CmdlineError` (a ``ValueError``) for a value the guest would
    reject, and when the words alone exceed the kernel's command-line limit.
    """
    if isinstance(args, str) or not all(isinstance(a, str) for a in args):
        raise CmdlineError("args: expected a sequence of strings")
    words = [f"{PREFIX}app={_check_app(app)}"]
    if args:
        words.append(f"{PREFIX}args={_b64(list(args))}")
    if env:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise CmdlineError("env: expected a mapping of strings to strings")
        words.append(f"{PREFIX}env={_b64(dict(env))}")
    if port is not None:
        words.append(f"{PREFIX}port={_check_port(str(port))}")
    if hostname is not None:
        words.append(f"{PREFIX}hostname={_check_hostname(hostname)}")
    if stop_timeout is not None:
        words.append(f"{PREFIX}stop_timeout={_seconds('stop_timeout', repr(float(stop_timeout)))!r}")
    if reap_grace is not None:
        words.append(f"{PREFIX}reap_grace={_seconds('reap_grace', repr(float(reap_grace)))!r}")
    if console is not None:
        _check_console(console)
        words.append(f"{PREFIX}console={console}")
    line = " ".join(words)
    if len(line) >= COMMAND_LINE_SIZE:
        raise CmdlineError(
            f"the uniframe.* keys take {len(line)} bytes, over the kernel's {COMMAND_LINE_SIZE}-byte "
            "command line: pass fewer or shorter arguments or environment variables "
            "(put large configuration in a file inside the image)")
    return line
