"""ConnectionStore on one SQLite file: the default for a single replica and for development.

All access goes through one worker thread that owns the sqlite3 connection, so the event loop
never blocks on the file and writes are serialised.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from broker.models import Check, Connection, Status
from broker.store import StoreConflict

T = TypeVar("T")

# Applied in order; PRAGMA user_version records how many have run.
MIGRATIONS = (
    """
    CREATE TABLE connections (
        tenant_id       TEXT PRIMARY KEY,
        status          TEXT NOT NULL,
        external_id     TEXT NOT NULL,
        region          TEXT NOT NULL,
        role_arn        TEXT NOT NULL DEFAULT '',
        account_id      TEXT NOT NULL DEFAULT '',
        created_at      TEXT NOT NULL,
        verified_at     TEXT,
        disconnected_at TEXT,
        checks          TEXT NOT NULL DEFAULT '[]',
        version         INTEGER NOT NULL
    );
    CREATE TABLE used_external_ids (
        external_id TEXT PRIMARY KEY,
        tenant_id   TEXT NOT NULL,
        used_at     TEXT NOT NULL
    );
    """,
)

COLUMNS = (
    "tenant_id, status, external_id, region, role_arn, account_id, "
    "created_at, verified_at, disconnected_at, checks, version"
)


class SqliteStore:
    """Connections in a SQLite file. `_db` is touched only from the `_worker` thread."""

    def __init__(self, path: str) -> None:
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection = self._worker.submit(_open, path).result()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self._worker, partial(fn, self._db, *args)
        )

    async def get(self, tenant_id: str) -> Connection | None:
        row = await self._run(_select, tenant_id)
        return None if row is None else _from_row(row)

    async def save(self, connection: Connection, *, new_external_id: bool) -> Connection:
        saved: Connection = await self._run(_save, connection, new_external_id)
        return saved

    async def close(self) -> None:
        await self._run(lambda db: db.close())
        self._worker.shutdown(wait=True)


def _open(path: str) -> sqlite3.Connection:
    if path != ":memory:" and not os.path.exists(path):
        # Nothing secret is stored, but connection data is nobody else's business either.
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=5000")
    with _transaction(db):
        current = db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            for statement in filter(str.strip, script.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
    return db


class _transaction:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _select(db: sqlite3.Connection, tenant_id: str) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = db.execute(
        f"SELECT {COLUMNS} FROM connections WHERE tenant_id = ?",  # noqa: S608 - constant columns
        (tenant_id,),
    ).fetchone()
    return row


def _save(db: sqlite3.Connection, connection: Connection, new_external_id: bool) -> Connection:
    saved = replace(connection, version=connection.version + 1)
    with _transaction(db):
        row = db.execute(
            "SELECT version FROM connections WHERE tenant_id = ?", (connection.tenant_id,)
        ).fetchone()
        if (row[0] if row else 0) != connection.version:
            raise StoreConflict(connection.tenant_id)
        if new_external_id:
            try:
                db.execute(
                    "INSERT INTO used_external_ids VALUES (?, ?, ?)",
                    (connection.external_id, connection.tenant_id, _text(datetime.now(UTC))),
                )
            except sqlite3.IntegrityError:
                raise StoreConflict(connection.tenant_id) from None
        db.execute(
            f"INSERT OR REPLACE INTO connections ({COLUMNS}) "  # noqa: S608 - constant columns
            "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            _to_row(saved),
        )
    return saved


def _text(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _to_row(c: Connection) -> tuple[Any, ...]:
    checks = json.dumps([[k.name, k.passed, k.detail] for k in c.checks])
    return (
        c.tenant_id,
        c.status.value,
        c.external_id,
        c.region,
        c.role_arn,
        c.account_id,
        _text(c.created_at),
        _text(c.verified_at),
        _text(c.disconnected_at),
        checks,
        c.version,
    )


def _from_row(row: tuple[Any, ...]) -> Connection:
    created_at = _time(row[6])
    assert created_at is not None
    return Connection(
        tenant_id=row[0],
        status=Status(row[1]),
        external_id=row[2],
        region=row[3],
        role_arn=row[4],
        account_id=row[5],
        created_at=created_at,
        verified_at=_time(row[7]),
        disconnected_at=_time(row[8]),
        checks=tuple(
            Check(name, bool(passed), detail) for name, passed, detail in json.loads(row[9])
        ),
        version=row[10],
    )
