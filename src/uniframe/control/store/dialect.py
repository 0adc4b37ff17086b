"""The few places where SQLite and PostgreSQL differ, behind one small connection class.

The repository code writes one SQL text with ``?`` placeholders and runs it on
either database; a :class:`Connection` converts placeholders, opens
transactions the way its database wants them, and turns driver exceptions into
the two kinds the store cares about: a constraint said no (:class:`Integrity`,
someone else got there first) or the database itself failed
(:class:`~uniframe.errors.StateError`).

SQLite specifics: WAL journal (readers never block the writer), ``synchronous
= FULL`` (a committed transaction survives a power cut, not only a crash),
``busy_timeout`` (a writer waits for the lock instead of failing at once),
foreign keys on (off by default in SQLite), and ``BEGIN IMMEDIATE`` for writes
(taking the write lock up front avoids the deadlock of two readers upgrading).
"""

from __future__ import annotations

import contextlib
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from uniframe.errors import StateError

BUSY_TIMEOUT_MS = 10_000


class Integrity(Exception):
    """A constraint refused a write (unique key, foreign key); the repository words the error."""


@dataclass(frozen=True)
class Result:
    rows: list[tuple[Any, ...]]
    rowcount: int


@dataclass(frozen=True)
class Types:
    """Column types spelled per dialect, substituted into the migrations' DDL."""

    serial: str   # an auto-increasing integer primary key
    boolean: str
    false: str
    real: str


class Connection(ABC):
    """One database connection, used by one thread at a time."""

    dialect: str
    types: Types

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result: ...

    @abstractmethod
    def begin(self, *, readonly: bool) -> None: ...

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def rollback(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @property
    def broken(self) -> bool:
        """True when the connection can no longer be used and must be replaced."""
        return False

    def __del__(self) -> None:
        # A thread's connection lives in its thread-local storage; when the thread
        # ends, this closes it, so threads that come and go do not pile up connections.
        with contextlib.suppress(Exception):
            self.close()

    @abstractmethod
    def lock(self, key: int) -> None:
        """Hold lock ``key`` (a signed 64-bit number) until the transaction ends."""


def redact(url: str) -> str:
    """The URL without its password, fit for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class SqliteConnection(Connection):
    dialect = "sqlite"
    types = Types(serial="INTEGER PRIMARY KEY AUTOINCREMENT", boolean="INTEGER", false="0",
                  real="REAL")

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; the store says BEGIN itself.
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                         timeout=BUSY_TIMEOUT_MS / 1000)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA synchronous=FULL")
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open the state store {path}: {_first_line(exc)}; "
                             "check that the directory is writable") from None
        if mode != "wal":
            raise StateError(f"state store {path}: SQLite refused WAL mode (journal_mode is "
                             f"{mode}); put the store on a local file system")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        try:
            cur = self._conn.execute(sql, tuple(params))
            return Result(cur.fetchall(), cur.rowcount)
        except sqlite3.IntegrityError as exc:
            raise Integrity(str(exc)) from None
        except sqlite3.Error as exc:
            raise StateError(f"state store {self.path}: {_first_line(exc)}") from None

    def begin(self, *, readonly: bool) -> None:
        self.execute("BEGIN DEFERRED" if readonly else "BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        if self._conn.in_transaction:
            self.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()

    def lock(self, key: int) -> None:
        """Nothing to do: a write transaction (``BEGIN IMMEDIATE``) holds SQLite's only lock."""


class PostgresConnection(Connection):
    dialect = "postgresql"
    types = Types(serial="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", boolean="BOOLEAN",
                  false="FALSE", real="DOUBLE PRECISION")

    def __init__(self, url: str) -> None:
        import psycopg

        self.url = url
        try:
            # autocommit: the store says BEGIN and COMMIT itself, as it does for SQLite.
            self._conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise StateError(f"cannot connect to the PostgreSQL state store {redact(url)}: "
                             f"{_first_line(exc)}; check the URL and that the server "
                             "is running") from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        import psycopg

        try:
            cur = self._conn.execute(sql.replace("?", "%s"), tuple(params))
            rows = cur.fetchall() if cur.description is not None else []
            return Result(rows, cur.rowcount)
        except psycopg.IntegrityError as exc:
            raise Integrity(str(exc)) from None
        except psycopg.Error as exc:
            raise StateError(f"state store {redact(self.url)}: {_first_line(exc)}") from None

    def begin(self, *, readonly: bool) -> None:
        self.execute("BEGIN READ ONLY" if readonly else "BEGIN")

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        if not self._conn.broken:
            self.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()

    @property
    def broken(self) -> bool:
        return bool(self._conn.broken or self._conn.closed)

    def lock(self, key: int) -> None:
        # A transaction-scoped advisory lock: released by COMMIT or ROLLBACK.
        self.execute("SELECT pg_advisory_xact_lock(?)", (key,))
