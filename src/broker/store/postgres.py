"""ConnectionStore on PostgreSQL, shared by every replica.

Each save notifies channel `broker_connections` (payload: the tenant id) in its own transaction,
so the other replicas drop the tenant's cached credentials and end or refresh its streams within
moments. A dedicated listening connection reconnects by itself; after a gap it asks for a full
re-check (`on_missed`), since notifications sent meanwhile are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

from broker.models import Connection, Event
from broker.store import RoleInUse, StoreConflict, StoreUnavailable
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

CHANNEL = "broker_connections"
LISTENER_NAME = "credential-broker-listener"  # application_name, to tell it apart
MIGRATION_LOCK = 0x62726F6B  # pg_advisory_xact_lock key: one replica migrates at a time
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 5.0
RELISTEN_BACKOFF_MAX = 10.0
LISTENER_PING_INTERVAL = 5.0

# Applied in order, each once; broker_schema records how many have run.
MIGRATIONS = (
    """
    CREATE TABLE connections (
        tenant_id       TEXT PRIMARY KEY,
        status          TEXT NOT NULL,
        external_id     TEXT NOT NULL,
        region          TEXT NOT NULL,
        role_arn        TEXT NOT NULL DEFAULT '',
        account_id      TEXT NOT NULL DEFAULT '',
        created_at      TIMESTAMPTZ NOT NULL,
        verified_at     TIMESTAMPTZ,
        disconnected_at TIMESTAMPTZ,
        checks          TEXT NOT NULL DEFAULT '[]',
        version         BIGINT NOT NULL
    );
    CREATE TABLE used_external_ids (
        external_id TEXT PRIMARY KEY,
        tenant_id   TEXT NOT NULL,
        used_at     TIMESTAMPTZ NOT NULL
    );
    """,
    """
    CREATE TABLE connection_events (
        id          BIGSERIAL PRIMARY KEY,
        tenant_id   TEXT NOT NULL,
        kind        TEXT NOT NULL,
        at          TIMESTAMPTZ NOT NULL,
        actor       TEXT NOT NULL,
        role_arn    TEXT NOT NULL,
        external_id TEXT NOT NULL,
        checks      TEXT NOT NULL
    );
    CREATE INDEX connection_events_by_tenant ON connection_events (tenant_id, id);
    """,
    # One role, one tenant: connections that hold their role (rows.HOLDING) hold it alone, so
    # two replicas verifying one role for two tenants cannot both win. Rows from before this
    # migration get their role_key from `_backfill_role_keys`.
    """
    ALTER TABLE connections ADD COLUMN role_key TEXT NOT NULL DEFAULT '';
    CREATE UNIQUE INDEX connections_role_held_once ON connections (role_key)
        WHERE role_key <> '' AND status IN ('ACTIVE', 'SUSPENDED');
    """,
)
ROLE_INDEX = "connections_role_held_once"

# What a store that cannot be reached raises, in asyncpg and below it.
UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
)


@contextlib.contextmanager
def _role_held_once(connection: Connection) -> Any:
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == ROLE_INDEX:
            raise RoleInUse(connection.tenant_id) from None
        raise


@contextlib.contextmanager
def _reachable() -> Any:
    try:
        yield
    except UNREACHABLE as exc:
        raise StoreUnavailable(f"the database cannot be reached ({type(exc).__name__})") from exc


class PostgresStore:
    """Connections in PostgreSQL. `_pool` serves queries; `listen` holds its own connection."""

    def __init__(self, url: str, pool: asyncpg.Pool) -> None:
        self._url = url
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        with _reachable():
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=10,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={"application_name": "credential-broker"},
            )
            await migrate(pool)
        return cls(url, pool)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy[Any]]:
        with _reachable():
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as connection:
                yield connection

    async def get(self, tenant_id: str) -> Connection | None:
        async with self._connection() as db:
            row = await db.fetchrow(
                f"SELECT {COLUMNS} FROM connections WHERE tenant_id = $1",  # noqa: S608
                tenant_id,
            )
        return None if row is None else from_row(row)

    async def role_holder(self, role_arn: str) -> str | None:
        async with self._connection() as db:
            holder = await db.fetchval(
                "SELECT tenant_id FROM connections WHERE role_key = $1 AND status = ANY($2)",
                role_key(role_arn),
                list(HOLDING),
            )
        return None if holder is None else str(holder)

    async def events(self, tenant_id: str, limit: int) -> list[Event]:
        async with self._connection() as db:
            rows = await db.fetch(
                f"SELECT {EVENT_COLUMNS} FROM connection_events "  # noqa: S608 - constant
                "WHERE tenant_id = $1 ORDER BY id DESC LIMIT $2",
                tenant_id,
                limit,
            )
        return [event_from_row(row) for row in rows]

    async def save(
        self, connection: Connection, *, new_external_id: bool, event: Event | None = None
    ) -> Connection:
        saved = replace(connection, version=connection.version + 1)
        columns = COLUMNS.split(", ")
        async with self._connection() as db, db.transaction():
            # The write itself checks the version, so two writers can never both succeed; the
            # role's unique index, that two tenants never hold one role.
            with _role_held_once(connection):
                if connection.version == 0:
                    written = await db.execute(
                        f"INSERT INTO connections ({COLUMNS}) "  # noqa: S608 - constant columns
                        f"VALUES ({', '.join(f'${i}' for i in range(1, len(columns) + 1))}) "
                        "ON CONFLICT (tenant_id) DO NOTHING",
                        *to_row(saved),
                    )
                else:
                    written = await db.execute(
                        "UPDATE connections SET "  # noqa: S608 - constant columns
                        + ", ".join(f"{c} = ${i}" for i, c in enumerate(columns[1:], start=2))
                        + f" WHERE tenant_id = $1 AND version = ${len(columns) + 1}",
                        *to_row(saved),
                        connection.version,
                    )
            if written.endswith(" 0"):
                raise StoreConflict(connection.tenant_id)
            if new_external_id:
                inserted = await db.fetchval(
                    "INSERT INTO used_external_ids VALUES ($1, $2, $3) "
                    "ON CONFLICT DO NOTHING RETURNING 1",
                    connection.external_id,
                    connection.tenant_id,
                    datetime.now(UTC),
                )
                if inserted is None:
                    raise StoreConflict(connection.tenant_id)
            if event is not None:
                await db.execute(
                    f"INSERT INTO connection_events ({EVENT_COLUMNS}) "  # noqa: S608 - constant
                    "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    *event_row(event),
                )
            await db.execute("SELECT pg_notify($1, $2)", CHANNEL, connection.tenant_id)
        return saved

    async def count_by_status(self) -> dict[str, int]:
        async with self._connection() as db:
            rows = await db.fetch("SELECT status, count(*) FROM connections GROUP BY status")
        return {row[0]: row[1] for row in rows}

    async def listen(self, on_change: Callable[[str], None], on_missed: Callable[[], None]) -> None:
        first = True
        backoff = 0.5
        while True:
            try:
                await self._listen_once(on_change, on_missed if not first else lambda: None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever it was, the listener must come back
                log.warning(
                    "not listening for changes; retrying",
                    extra={"error": type(exc).__name__, "retry_in": backoff},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RELISTEN_BACKOFF_MAX)
            else:
                backoff = 0.5
            first = False

    async def _listen_once(
        self, on_change: Callable[[str], None], on_listening: Callable[[], None]
    ) -> None:
        """Listen on one connection until it is lost (returns) or cannot be made (raises)."""
        listener = await asyncpg.connect(
            self._url,
            timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": LISTENER_NAME},
        )
        lost = asyncio.Event()
        listener.add_termination_listener(lambda _: lost.set())
        try:
            await listener.add_listener(CHANNEL, lambda *args: on_change(args[3]))
            log.info("listening for changes")
            on_listening()
            while not lost.is_set():  # a dropped socket is noticed by the next query
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), timeout=LISTENER_PING_INTERVAL)
                if not lost.is_set():
                    await listener.execute("SELECT 1", timeout=CONNECT_TIMEOUT)
        finally:
            listener.terminate()
        log.warning("lost the listening connection; reconnecting")

    async def close(self) -> None:
        await self._pool.close()


async def migrate(pool: asyncpg.Pool) -> int:
    """Apply the migrations not yet applied; safe when replicas start at once (an advisory
    lock lets one migrate while the others wait). Returns the schema version."""
    async with pool.acquire() as db, db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await db.execute("CREATE TABLE IF NOT EXISTS broker_schema (version INTEGER NOT NULL)")
        current = await db.fetchval("SELECT max(version) FROM broker_schema") or 0
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            await db.execute(script)
            await db.execute("INSERT INTO broker_schema VALUES ($1)", number)
        await _backfill_role_keys(db)
        return len(MIGRATIONS)


async def _backfill_role_keys(db: Any) -> None:
    """Give rows stored before role keys existed theirs. Two tenants holding one role from
    before are left as they are, and logged: one of them must disconnect."""
    rows = await db.fetch(
        "SELECT tenant_id, role_arn FROM connections WHERE role_key = '' AND role_arn <> ''"
    )
    for tenant_id, role_arn in rows:
        try:
            async with db.transaction():  # a savepoint: a clash undoes this row alone
                await db.execute(
                    "UPDATE connections SET role_key = $1 WHERE tenant_id = $2",
                    role_key(role_arn),
                    tenant_id,
                )
        except asyncpg.UniqueViolationError:
            log.error(
                "two tenants hold one role; disconnect one of them",
                extra={"tenant": tenant_id, "role_arn": role_arn},
            )
