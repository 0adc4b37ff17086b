"""Replica logs for the API: the last lines of each, then, when asked, what comes next.

Following polls every log from the offset already sent, instead of holding a
driver's ``follow`` generator open per replica: a poll loop can stop at any
moment (the client hung up, the object went away), where a blocked
generator keeps its thread until the replica writes again. Each poll also
yields an empty chunk, the daemon's chance to notice a client that left.

An object's logs interleave its replicas line by line, each line prefixed by
``[replica-id]``, and pick up replicas that appear while following (a
rollout's new ones).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from uniframe.runtime.driver import Driver, ReplicaNotFoundError
from uniframe.runtime.replica import ReplicaState

POLL_SECONDS = 0.25


def tail(chunks: Iterable[bytes], lines: int | None) -> tuple[bytes, int]:
    """The last ``lines`` lines of a stream (all of it for None), and the stream's length."""
    total = 0
    if lines is None:
        data = b"".join(chunks)
        return data, len(data)
    kept: deque[bytes] = deque(maxlen=lines or 1)
    partial = b""
    for chunk in chunks:
        total += len(chunk)
        parts = (partial + chunk).split(b"\n")
        partial = parts.pop()
        kept.extend(p + b"\n" for p in parts)
    if partial:
        kept.append(partial)
    return (b"".join(kept) if lines else b""), total


@dataclass
class LogSource:
    """One replica's log, and how far it has been sent."""

    replica_id: str
    driver: Driver
    offset: int = 0
    partial: bytes = field(default=b"", repr=False)

    def read(self) -> bytes:
        """What the replica wrote since the last read (nothing once the replica is gone)."""
        try:
            data = b"".join(self.driver.logs(self.replica_id, offset=self.offset))
        except ReplicaNotFoundError:
            return b""
        self.offset += len(data)
        return data

    def running(self) -> bool:
        try:
            return self.driver.inspect(self.replica_id).state is ReplicaState.RUNNING
        except ReplicaNotFoundError:
            return False


def replica_log(source: LogSource, lines: int | None, follow: bool) -> Iterator[bytes]:
    """One replica's log, raw; with ``follow``, until the replica stops running."""
    try:
        data, source.offset = tail(source.driver.logs(source.replica_id), lines)
    except ReplicaNotFoundError:
        return
    yield data
    while follow:
        alive = source.running()  # asked before reading, so nothing written at exit is lost
        yield source.read()
        if not alive:
            return
        time.sleep(POLL_SECONDS)


def _prefixed(source: LogSource, data: bytes, final: bool) -> bytes:
    """Whole lines of ``data`` with the replica's prefix; a trailing partial line waits."""
    parts = (source.partial + data).split(b"\n")
    source.partial = parts.pop()
    if final and source.partial:
        parts.append(source.partial)
        source.partial = b""
    prefix = f"[{source.replica_id}] ".encode()
    return b"".join(prefix + p + b"\n" for p in parts)


def object_log(sources: Callable[[], list[LogSource]], lines: int | None, follow: bool,
               exists: Callable[[], bool]) -> Iterator[bytes]:
    """Every replica's log, each line prefixed; with ``follow``, until the object is gone.

    ``sources()`` is asked again at every poll, so replicas created while
    following join in (from their first byte).
    """
    known: dict[str, LogSource] = {}
    for source in sources():
        try:
            data, source.offset = tail(source.driver.logs(source.replica_id), lines)
        except ReplicaNotFoundError:
            data = b""
        known[source.replica_id] = source
        yield _prefixed(source, data, final=not follow)
    while follow:
        alive = exists()
        current = {s.replica_id: s for s in sources()}
        for rid, source in current.items():
            known.setdefault(rid, source)
        out = []
        for rid, source in list(known.items()):
            gone = rid not in current
            out.append(_prefixed(source, source.read(), final=gone))
            if gone:
                del known[rid]
        yield b"".join(out)
        if not alive:
            return
        time.sleep(POLL_SECONDS)
