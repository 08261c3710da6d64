"""ConnectionStore on one SQLite file: the default for a single replica and for development.

All access goes through one worker thread that owns the sqlite3 connection, so the event loop
never blocks on the file and writes are serialised.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from broker.config import DEFAULT_TENANT_MAX_EVENTS
from broker.models import Connection, Event
from broker.store import RoleInUse, StoreConflict, retention
from broker.store.rows import (
    COLUMNS,
    EVENT_COLUMNS,
    HOLDING,
    event_from_row,
    event_row,
    from_row,
    role_key,
    to_row,
)

log = logging.getLogger(__name__)

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
    """
    CREATE TABLE connection_events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant_id   TEXT NOT NULL,
        kind        TEXT NOT NULL,
        at          TEXT NOT NULL,
        actor       TEXT NOT NULL,
        role_arn    TEXT NOT NULL,
        external_id TEXT NOT NULL,
        checks      TEXT NOT NULL
    );
    CREATE INDEX connection_events_by_tenant ON connection_events (tenant_id, id);
    """,
    # One role, one tenant: connections that hold their role (rows.HOLDING) hold it alone.
    # Rows from before this migration get their role_key from `_backfill_role_keys`.
    """
    ALTER TABLE connections ADD COLUMN role_key TEXT NOT NULL DEFAULT '';
    CREATE UNIQUE INDEX connections_role_held_once ON connections (role_key)
        WHERE role_key <> '' AND status IN ('ACTIVE', 'SUSPENDED');
    """,
    # Event retention (store/retention.py): a row may stand for `repeats` events, the first of
    # them at `first_at` (NULL: one event, at `at`); the index finds a tenant's newest event of
    # a kind, and its oldest of a kind.
    """
    ALTER TABLE connection_events ADD COLUMN repeats INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE connection_events ADD COLUMN first_at TEXT;
    CREATE INDEX connection_events_by_kind ON connection_events (tenant_id, kind, id);
    """
    + ";".join(retention.COMPACT_STORED_LINK_CHANGES),
)


class SqliteStore:
    """Connections in a SQLite file. `_db` is touched only from the `_worker` thread. Each
    tenant keeps `tenant_max_events` events at most (store/retention.py)."""

    def __init__(self, path: str, *, tenant_max_events: int = DEFAULT_TENANT_MAX_EVENTS) -> None:
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection = self._worker.submit(_open, path).result()
        self._max_events = tenant_max_events
        self._opened = time.monotonic()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self._worker, partial(fn, self._db, *args)
        )

    async def get(self, tenant_id: str) -> Connection | None:
        row = await self._run(_select, tenant_id)
        return None if row is None else from_row(row, datetime.fromisoformat)

    async def save(
        self, connection: Connection, *, new_external_id: bool, event: Event | None = None
    ) -> Connection:
        saved: Connection = await self._run(
            _save, connection, new_external_id, event, self._max_events
        )
        return saved

    async def role_holder(self, role_arn: str) -> str | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT tenant_id FROM connections WHERE role_key = ? AND status IN (?, ?)",
                (role_key(role_arn), *HOLDING),
            ).fetchone()
        )
        return None if row is None else str(row[0])

    async def events(self, tenant_id: str, limit: int) -> list[Event]:
        rows = await self._run(
            lambda db: db.execute(
                f"SELECT {EVENT_COLUMNS} FROM connection_events "  # noqa: S608 - constant
                "WHERE tenant_id = ? ORDER BY id DESC LIMIT ?",
                (tenant_id, limit),
            ).fetchall()
        )
        return [event_from_row(row, datetime.fromisoformat) for row in rows]

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT status, count(*) FROM connections GROUP BY status"
            ).fetchall()
        )
        return {status: count for status, count in rows}

    async def listen(
        self,
        on_change: Callable[[str], None],
        on_missed: Callable[[], None],
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        """One SQLite file serves one replica: nobody else changes it, nothing to hear."""
        await asyncio.Event().wait()

    def channel_alive(self) -> tuple[float, float] | None:
        """Nobody else writes the file, so nothing can be missed: one stretch, from opening
        the store until now."""
        return (self._opened, time.monotonic())

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
        _backfill_role_keys(db)
    return db


def _backfill_role_keys(db: sqlite3.Connection) -> None:
    """Give rows stored before role keys existed theirs. Where two tenants held one role from
    before (something only an older broker let happen), the one met second no longer holds it:
    it goes back to PENDING and must verify again, and the log names it."""
    rows = db.execute(
        "SELECT tenant_id, role_arn FROM connections WHERE role_key = '' AND role_arn <> ''"
    ).fetchall()
    for tenant_id, role_arn in rows:
        try:
            db.execute(
                "UPDATE connections SET role_key = ? WHERE tenant_id = ?",
                (role_key(role_arn), tenant_id),
            )
        except sqlite3.IntegrityError:
            db.execute(
                "UPDATE connections SET status = 'PENDING', version = version + 1, role_key = ? "
                "WHERE tenant_id = ?",
                (role_key(role_arn), tenant_id),
            )
            log.error(
                "two tenants held one role; this one is PENDING now and must verify again",
                extra={"tenant": tenant_id, "role_arn": role_arn},
            )


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


def _save(
    db: sqlite3.Connection,
    connection: Connection,
    new_external_id: bool,
    event: Event | None,
    max_events: int,
) -> Connection:
    saved = replace(connection, version=connection.version + 1)
    deleted: list[str] = []
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
                    (connection.external_id, connection.tenant_id, datetime.now(UTC).isoformat()),
                )
            except sqlite3.IntegrityError:
                raise StoreConflict(connection.tenant_id) from None
        # An upsert, not INSERT OR REPLACE: that would settle a clash on the role's unique
        # index by deleting the other tenant's row.
        try:
            db.execute(
                f"INSERT INTO connections ({COLUMNS}) "  # noqa: S608 - constant columns
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (tenant_id) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS.split(", ")[1:]),
                to_row(saved, datetime.isoformat),
            )
        except sqlite3.IntegrityError:
            raise RoleInUse(connection.tenant_id) from None
        if event is not None:
            deleted = _store_event(db, event, max_events)
    retention.pruned(connection.tenant_id, deleted)
    return saved


def _store_event(db: sqlite3.Connection, event: Event, max_events: int) -> list[str]:
    """Insert `event`, or fold it into the tenant's newest row; then delete the tenant's rows
    past `max_events` (store/retention.py), and return their kinds. Inside `_save`'s
    transaction, which BEGIN IMMEDIATE makes the only writer of the file."""
    row = event_row(event, datetime.isoformat)
    newest = db.execute(retention.NEWEST, (event.tenant_id, event.tenant_id)).fetchone()
    kept = 0 if newest is None else newest[6]
    if newest is not None and retention.repeats(newest, event):
        db.execute(retention.MERGE, (row[2], row[3], row[4], row[6], newest[0]))
    else:
        db.execute(
            f"INSERT INTO connection_events ({EVENT_COLUMNS}) "  # noqa: S608 - constant
            "VALUES (?,?,?,?,?,?,?)",
            row,
        )
        kept += 1
    if kept <= max_events:
        return []
    values = retention.prune_values(event.tenant_id, kept - max_events)
    return [kind for (kind,) in db.execute(retention.PRUNE, values).fetchall()]
