"""A small synchronous face on ``qemu.qmp``'s asyncio ``QMPClient``.

The CLI and the driver issue a handful of QMP commands (``query-status``,
``quit``) one at a time; each call opens a connection, negotiates, runs one
command and closes, so no event loop or connection outlives the call and a
crashed QEMU can never wedge the caller for longer than ``timeout``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from uniframe.errors import RuntimeDriverError


class QmpError(RuntimeDriverError):
    """QMP could not be reached, or QEMU refused a command."""


def _as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"return": value}


class Qmp:
    def __init__(self, socket_path: Path, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    async def _execute(self, command: str, arguments: dict[str, Any] | None) -> object:
        client = QMPClient("uniframe")
        await asyncio.wait_for(client.connect(str(self.socket_path)), self.timeout)
        try:
            return await asyncio.wait_for(client.execute(command, arguments), self.timeout)
        finally:
            await client.disconnect()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> object:
        try:
            return asyncio.run(self._execute(command, arguments))
        except (OSError, QMPError, TimeoutError, EOFError) as exc:
            raise QmpError(f"QMP {command} on {self.socket_path} failed: {exc or type(exc).__name__}") from None

    def status(self) -> dict[str, Any]:
        """``query-status``: e.g. ``{"status": "running", "running": True}``."""
        return _as_dict(self.execute("query-status"))

    def quit(self) -> None:
        """Ask QEMU to exit now; QEMU closing the socket mid-reply counts as success."""
        try:
            self.execute("quit")
        except QmpError:
            if self.socket_path.exists():
                raise
