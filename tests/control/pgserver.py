"""A real, throwaway PostgreSQL server for the tests: Debian's binaries, a temp dir, a unix socket.

The server listens on no TCP port at all (``listen_addresses=''``), only on a
socket in its own directory, so it cannot clash with another server on the
machine. PostgreSQL refuses to run as root, so as root every command runs as
the ``postgres`` user through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

PORT = 5432  # only names the socket file inside our own directory


def find_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PgServer:
    bindir: Path
    base: Path

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    def url(self, db: str = "postgres") -> str:
        user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        return f"postgresql://{user}@/{db}?host={self.base}&port={PORT}"

    def start(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        self.base.chmod(0o755)
        subprocess.run(_as_postgres([str(self.bindir / "initdb"), "-D", str(self.datadir),
                                     "-A", "trust", "-E", "UTF8", "--no-sync",
                                     *(["-U", "postgres"] if os.geteuid() == 0 else [])]),
                       check=True, capture_output=True, text=True)
        subprocess.run(_as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
                                     "-l", str(self.base / "server.log"), "-w", "-t", "60",
                                     "-o", f"-c listen_addresses='' -k {self.base} -p {PORT}",
                                     "start"]),
                       check=True, capture_output=True, text=True)

    def stop(self) -> None:
        subprocess.run(_as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
                                     "-m", "immediate", "-w", "stop"]),
                       capture_output=True, text=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        path = self.base / "server.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.is_file() else ""

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        """A fresh, empty database per test: the tests share the server, never state."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def terminate_clients(self, db: str) -> int:
        """Kill the server side of every connection to ``db``, as a server restart would."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = %s AND pid <> pg_backend_pid()", (db,)).fetchall()
        return len(rows)


def start_server() -> PgServer:
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql); "
                           "run scripts/install.sh")
    server = PgServer(bindir, Path(tempfile.mkdtemp(prefix="uf-pg-")))
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        log = server.log_tail()
        server.stop()
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}\n{log}") from None
    return server
