"""Helpers the control-plane tests share: raw SQL behind the store's back, helper scripts,
a real daemon in a thread, and the cleanup of every process a test started."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniframe.control.api.server import Daemon, DaemonConfig
from uniframe.control.reconciler import Reconciler
from uniframe.control.store import ObjectRecord, Store

HERE = Path(__file__).parent


def raw_query(target: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run SQL on the database behind the store's back, with the plain driver."""
    if target.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(target, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), params)
            return cur.fetchall() if cur.description is not None else []
    with sqlite3.connect(target) as conn:
        return conn.execute(sql, params).fetchall()


def python_script(name: str) -> list[str]:
    """The command line that runs one of the helper scripts beside this file."""
    return [sys.executable, str(HERE / name)]


# -- a real daemon in this process ---------------------------------------------------------

SERVICE = "InferenceService"


def service_yaml(model: str, *, name: str = "iris", replicas: int = 1, extra: str = "") -> str:
    """An InferenceService on the process runtime (replicas start in a fraction of a second)."""
    return (f"apiVersion: uniframe.dev/v1alpha1\nkind: InferenceService\n"
            f"metadata: {{name: {name}}}\n"
            f"spec:\n  model: {model}\n  runtime: process\n  replicas: {replicas}\n{extra}")


def strays(root: Path) -> list[int]:
    """PIDs of the processes whose command line mentions ``root`` (replicas, proxies, wrappers)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(root) in argv:
            found.append(int(d.name))
    return found


def kill_strays(root: Path) -> None:
    for pid in strays(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class LiveDaemon:
    """A daemon serving real HTTP from a thread of the test process, and its store."""

    url: str
    store: Store
    token: str = ""

    @property
    def headers(self) -> dict[str, str]:
        """The credential every request to the daemon needs."""
        return {"Authorization": f"Bearer {self.token}"}

    def objects(self, include_deleted: bool = True) -> list[ObjectRecord]:
        with self.store.tx(readonly=True) as tx:
            return tx.list_objects(include_deleted=include_deleted)


@contextlib.contextmanager
def running_daemon(store_target: str | Path, root: Path, *,
                   period: float = 0.2) -> Iterator[LiveDaemon]:
    """``uniframe daemon`` as the CLI builds it, on a free port; torn down with what it ran.

    Data, state and images follow ``$UNIFRAME_DATA`` and ``$UNIFRAME_STATE``,
    which the caller points under ``root``. It listens on loopback TCP with a
    token of its own, which ``$UNIFRAME_TOKEN`` carries to the CLI meanwhile,
    and specs may name files under ``root``. On exit every object is deleted
    and the reconciler given time to stop its replicas and endpoints; anything
    still running under ``root`` after that is killed.
    """
    store = Store.open(str(store_target))
    config = DaemonConfig(socket=None, listen=("127.0.0.1", 0),
                          token_file=root / "daemon.token", allow_paths=(root,))
    daemon = Daemon(store, Reconciler(store), config, period=period)
    thread = threading.Thread(target=daemon.serve_forever, name="test-daemon", daemon=True)
    thread.start()
    live = LiveDaemon(daemon.url, store, daemon.token)
    earlier_token = os.environ.get("UNIFRAME_TOKEN")
    os.environ["UNIFRAME_TOKEN"] = daemon.token
    try:
        yield live
    finally:
        if earlier_token is None:
            os.environ.pop("UNIFRAME_TOKEN", None)
        else:
            os.environ["UNIFRAME_TOKEN"] = earlier_token
        try:
            with store.tx() as tx:
                for obj in tx.list_objects():
                    tx.delete_object(obj.kind, obj.name)
            daemon.reconciler.wake()
            deadline = time.monotonic() + 30
            while live.objects() and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            daemon.shutdown()
            thread.join(timeout=60)
            store.close()
            kill_strays(root)


def until(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll ``check`` until it returns something true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)
