"""Fixtures for the control plane: every store test runs on a real SQLite file and a real PostgreSQL.

``store_target`` is parametrized over both backends, so one test function is
one claim about both. PostgreSQL is a server this test session starts itself
(see ``pgserver.py``) and stops at the end; each test gets its own database.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from control_helpers import LiveDaemon, running_daemon
from pgserver import PgServer, start_server

from uniframe.control.store import Store


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    try:
        server = start_server()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where a store lives: a SQLite file path, or a ``postgresql://`` URL of a fresh database."""
    if request.param == "sqlite":
        yield str(tmp_path / "state" / "state.db")
        return
    server: PgServer = request.getfixturevalue("pg_server")
    db = server.create_database()
    try:
        yield server.url(db)
    finally:
        server.drop_database(db)


@pytest.fixture
def store(store_target: str) -> Iterator[Store]:
    s = Store.open(store_target)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveDaemon]:
    """A real daemon in this process on loopback TCP, with its data, state and token under the
    test's own directory, and the CLI pointed at it (``$UNIFRAME_DAEMON``, ``$UNIFRAME_TOKEN``)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("UNIFRAME_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("UNIFRAME_STATE", str(tmp_path / "st"))
    monkeypatch.setenv("UNIFRAME_STORE", str(tmp_path / "unused.db"))
    with running_daemon(tmp_path / "state.db", tmp_path) as daemon:
        monkeypatch.setenv("UNIFRAME_DAEMON", daemon.url)
        yield daemon
