"""QMP, QEMU's JSON control protocol, as one short synchronous exchange per call.

The CLI and the drivers issue a handful of commands (``query-status`` while
QEMU starts, ``system_powerdown`` and ``quit`` to stop it, queries in tests)
one at a time, and often to a QEMU that is exiting at that very moment: the
guest rebooted or powered off just as the command went out. So each call
opens the socket, reads the greeting, enters command mode, runs one command
and closes, on a plain blocking socket: whatever QEMU does (answers, closes
the connection at any point, never answers) ends as the result or as a
:class:`QmpError`, after at most ``timeout`` for the handshake and
``timeout`` for the command.

Why not ``qemu.qmp``'s asyncio ``QMPClient`` (used here before): its
background reader changes the client's state when the peer hangs up, and
its ``connect()`` then asserts on that state, so a QEMU that closed the
connection right after the handshake (quitting because its guest had just
shut down) raised a bare ``AssertionError`` through ``stop`` and ``rm -f``.
On a loaded host that window was hit by the driver tests.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from uniframe.errors import RuntimeDriverError


class QmpError(RuntimeDriverError):
    """QMP could not be reached, or QEMU refused a command."""


class _Closed(Exception):
    """QEMU closed the connection (it is exiting, or was never a QMP server)."""


def _as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"return": value}


class _Session:
    """One connection: newline-delimited JSON both ways, every wait bounded by a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.deadline = 0.0
        self.next_id = 0

    def budget(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)

    def connect(self, path: Path) -> None:
        self._arm()
        self.sock.connect(str(path))

    def send(self, command: str, arguments: dict[str, Any] | None) -> int:
        self.next_id += 1
        message: dict[str, Any] = {"execute": command, "id": self.next_id}
        if arguments is not None:
            message["arguments"] = arguments
        self._arm()
        self.sock.sendall(json.dumps(message).encode() + b"\r\n")
        return self.next_id

    def receive(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            self._arm()
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise _Closed
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError(f"not a QMP message: {line[:200]!r}")
        return message

    def reply(self, command: str, message_id: int) -> object:
        """The answer to our command; events and anything not ours are skipped."""
        while True:
            message = self.receive()
            if message.get("id") != message_id:
                continue
            if "error" in message:
                error = message["error"]
                desc = error.get("desc", error) if isinstance(error, dict) else error
                raise QmpError(f"QEMU refused QMP {command}: {desc}")
            return message.get("return")


class Qmp:
    def __init__(self, socket_path: Path, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _run(self, command: str, arguments: dict[str, Any] | None, *, closing_ok: bool) -> object:
        """Handshake, then ``command``; with ``closing_ok`` a hang-up after it was sent is success."""
        sent = False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                session = _Session(sock)
                session.budget(self.timeout)
                session.connect(self.socket_path)
                greeting = session.receive()
                if "QMP" not in greeting:
                    raise ValueError(f"no QMP greeting: {str(greeting)[:200]}")
                session.reply("qmp_capabilities", session.send("qmp_capabilities", None))
                session.budget(self.timeout)
                message_id = session.send(command, arguments)
                sent = True
                return session.reply(command, message_id)
        except QmpError:
            raise
        except (_Closed, BrokenPipeError, ConnectionResetError):
            if sent and closing_ok:
                return None
            reason = "QEMU closed the connection"
        except (OSError, ValueError) as exc:  # refused, missing, timed out, garbled
            reason = str(exc) or type(exc).__name__
        raise QmpError(f"QMP {command} on {self.socket_path} failed: {reason}")

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> object:
        """Run one command and return what it returns (``QmpError`` if QEMU refused it)."""
        return self._run(command, arguments, closing_ok=False)

    def status(self) -> dict[str, Any]:
        """``query-status``: e.g. ``{"status": "running", "running": True}``."""
        return _as_dict(self.execute("query-status"))

    def quit(self) -> None:
        """Ask QEMU to exit now.

        QEMU closing the connection once ``quit`` is sent, with or without its
        reply, is success; so is a socket that is gone (QEMU exited already).
        """
        try:
            self._run("quit", None, closing_ok=True)
        except QmpError:
            if self.socket_path.exists():
                raise
