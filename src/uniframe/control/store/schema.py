"""The store's tables, as an append-only list of migrations.

A database records how many migrations it has had in ``schema_version``;
opening it runs the missing ones in one transaction, so a store is either at
the old version or the new one, never between. Never edit a migration that has
shipped: append a new one.

Specs, tensor descriptions and metadata are JSON text in both dialects: the
store reads them back whole and never queries inside them, and one column type
keeps one SQL text for both databases.
"""

from __future__ import annotations

from uniframe.control.store.dialect import Connection, Types
from uniframe.errors import StateError


def _v1(t: Types) -> list[str]:
    return [
        f"""CREATE TABLE objects (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            spec TEXT NOT NULL,
            spec_digest TEXT NOT NULL,
            generation BIGINT NOT NULL,
            created_at {t.real} NOT NULL,
            updated_at {t.real} NOT NULL,
            deleted {t.boolean} NOT NULL DEFAULT {t.false},
            PRIMARY KEY (kind, name))""",
        f"""CREATE TABLE replicas (
            id TEXT PRIMARY KEY,
            object_kind TEXT NOT NULL,
            object_name TEXT NOT NULL,
            driver TEXT NOT NULL,
            image_digest TEXT NOT NULL,
            state TEXT NOT NULL,
            desired TEXT NOT NULL,
            host_port INTEGER,
            created_at {t.real} NOT NULL,
            updated_at {t.real} NOT NULL,
            last_error TEXT NOT NULL DEFAULT '',
            restarts INTEGER NOT NULL DEFAULT 0,
            next_restart_at {t.real},
            FOREIGN KEY (object_kind, object_name) REFERENCES objects (kind, name))""",
        "CREATE INDEX replicas_object ON replicas (object_kind, object_name)",
        f"""CREATE TABLE events (
            id {t.serial},
            at {t.real} NOT NULL,
            object_kind TEXT NOT NULL,
            object_name TEXT NOT NULL,
            replica_id TEXT,
            type TEXT NOT NULL CHECK (type IN ('Normal', 'Warning')),
            reason TEXT NOT NULL,
            message TEXT NOT NULL)""",
        "CREATE INDEX events_object ON events (object_kind, object_name, id)",
        f"""CREATE TABLE models (
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            format TEXT NOT NULL,
            inputs TEXT NOT NULL,
            outputs TEXT NOT NULL,
            size BIGINT NOT NULL,
            created_at {t.real} NOT NULL,
            metadata TEXT NOT NULL,
            PRIMARY KEY (name, version))""",
        "CREATE INDEX models_sha256 ON models (sha256)",
        f"""CREATE TABLE services (
            name TEXT PRIMARY KEY,
            host_port INTEGER NOT NULL UNIQUE,
            created_at {t.real} NOT NULL)""",
    ]


def _v2(t: Types) -> list[str]:
    """Revisions and rollouts: what each spec change rolls out, and how far it got."""
    return [
        "ALTER TABLE replicas ADD COLUMN revision TEXT NOT NULL DEFAULT ''",
        f"""CREATE TABLE revisions (
            object_kind TEXT NOT NULL,
            object_name TEXT NOT NULL,
            number INTEGER NOT NULL,
            digest TEXT NOT NULL,
            spec TEXT NOT NULL,
            created_at {t.real} NOT NULL,
            PRIMARY KEY (object_kind, object_name, digest))""",
        f"""CREATE TABLE rollouts (
            object_kind TEXT NOT NULL,
            object_name TEXT NOT NULL,
            strategy TEXT NOT NULL,
            from_digest TEXT NOT NULL,
            to_digest TEXT NOT NULL,
            state TEXT NOT NULL,
            traffic_percent INTEGER,
            message TEXT NOT NULL DEFAULT '',
            started_at {t.real} NOT NULL,
            updated_at {t.real} NOT NULL,
            PRIMARY KEY (object_kind, object_name))""",
    ]


MIGRATIONS = [_v1, _v2]
SCHEMA_VERSION = len(MIGRATIONS)
SCHEMA_LOCK = 0x756E6966  # "unif"


def migrate(conn: Connection, where: str) -> int:
    """Bring the database up to :data:`SCHEMA_VERSION`; return the version it was at."""
    conn.begin(readonly=False)
    try:
        conn.lock(SCHEMA_LOCK)  # two processes opening a fresh database migrate in turn
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        rows = conn.execute("SELECT version FROM schema_version").rows
        current = int(rows[0][0]) if rows else 0
        if current > SCHEMA_VERSION:
            raise StateError(
                f"state store {where} has schema version {current}, newer than this uniframe "
                f"knows ({SCHEMA_VERSION}); upgrade uniframe or open another store"
            )
        for migration in MIGRATIONS[current:]:
            for statement in migration(conn.types):
                conn.execute(statement)
        if not rows:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif current != SCHEMA_VERSION:
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return current
