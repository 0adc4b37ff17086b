"""Helpers the control-plane tests share: raw SQL behind the store's back, helper scripts."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Any

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
