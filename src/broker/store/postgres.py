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
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

from broker.config import DEFAULT_TENANT_MAX_EVENTS
from broker.models import Connection, Event
from broker.store import RoleInUse, StoreConflict, StoreUnavailable, retention
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
CONNECT_TIMEOUT = 2.0  # to make a connection (TCP and authentication) or take one from the pool
COMMAND_TIMEOUT = 5.0  # the whole of one call of the store, waiting for a connection included
RELISTEN_BACKOFF_MAX = 5.0  # the longest pause between the listener's attempts to come back
# The listener proves its connection alive this often (`channel_alive`), and gives up on it
# when a ping goes unanswered this long: a hung database is noticed within about 3 s.
LISTENER_PING_INTERVAL = 2.0
LISTENER_PING_TIMEOUT = 1.0

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
    # The database keeps role_key right whoever writes the row, so a replica still on an older
    # version (mid rolling upgrade) that knows nothing of role keys cannot activate a role
    # another tenant holds. The same rule as rows.role_key.
    """
    CREATE FUNCTION broker_role_key() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.role_key := CASE
            WHEN NEW.role_arn ~ '^arn:[^:]+:iam::[0-9]+:role/' THEN
                split_part(NEW.role_arn, ':', 2) || ':' || split_part(NEW.role_arn, ':', 5)
                || ':' || lower(regexp_replace(NEW.role_arn, '^.*/', ''))
            ELSE '' END;
        RETURN NEW;
    END $$;
    CREATE TRIGGER connections_role_key BEFORE INSERT OR UPDATE ON connections
        FOR EACH ROW EXECUTE FUNCTION broker_role_key();
    """,
    # Event retention (store/retention.py): a row may stand for `repeats` events, the first of
    # them at `first_at` (NULL: one event, at `at`); the index finds a tenant's newest event of
    # a kind, and its oldest of a kind.
    """
    ALTER TABLE connection_events ADD COLUMN repeats INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE connection_events ADD COLUMN first_at TIMESTAMPTZ;
    CREATE INDEX connection_events_by_kind ON connection_events (tenant_id, kind, id);
    """
    + ";".join(retention.COMPACT_STORED_LINK_CHANGES),
)
ROLE_INDEX = "connections_role_held_once"
_NEWEST, _MERGE, _PRUNE = map(
    retention.numbered, (retention.NEWEST, retention.MERGE, retention.PRUNE)
)

# Every way the database fails a call, in asyncpg and below it: the one list `_reachable`
# turns into StoreUnavailable (retryable, UNAVAILABLE). Anything else is a bug, or a domain
# answer (StoreConflict, RoleInUse), and stays what it is.
UNREACHABLE: tuple[type[Exception], ...] = (
    # Nothing answers: refused, reset, no route (OSError); a hung server, past a timeout.
    OSError,
    TimeoutError,
    # The connection broke or could not be made (SQLSTATE class 08); asyncpg's side of it:
    # closed, "another operation is in progress", the pool closing (InterfaceError), its
    # protocol state lost or no host matching target_session_attrs (InternalClientError).
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    # The server refuses the session: too many connections (class 53, with disk full and out
    # of memory), authentication failed (class 28: e.g. a password rotated under a running
    # replica), the database gone or not accepting connections.
    asyncpg.InsufficientResourcesError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.ObjectNotInPrerequisiteStateError,
    # An operator or the server ended it (class 57): shut down, crashed, starting up,
    # cancelled, idle timeout, database dropped.
    asyncpg.OperatorInterventionError,
    # A server that cannot write: a read-only failover target, a standby.
    asyncpg.ReadOnlySQLTransactionError,
    # The server's own I/O failed (class 58).
    asyncpg.PostgresSystemError,
)
_ABANDONED: tuple[type[BaseException], ...] = (asyncio.CancelledError, *UNREACHABLE)


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
    """UNREACHABLE → StoreUnavailable, whose message names the error's class and nothing else
    (asyncpg's messages may carry a host, a user or a database name)."""
    try:
        yield
    except asyncpg.DataError:  # a value the query cannot take: a bug, not an outage
        raise
    except UNREACHABLE as exc:
        raise StoreUnavailable(f"the database is unavailable ({type(exc).__name__})") from exc


class PostgresStore:
    """Connections in PostgreSQL. `_pool` serves queries; `listen` holds its own connection.
    `_channel_start` and `_channel_last` are the current (or last) stretch of that listening
    connection (`channel_alive`); only `_listen_once` changes them. Each tenant keeps
    `_max_events` events at most (store/retention.py)."""

    def __init__(
        self, url: str, pool: asyncpg.Pool, *, tenant_max_events: int = DEFAULT_TENANT_MAX_EVENTS
    ) -> None:
        self._url = url
        self._pool = pool
        self._max_events = tenant_max_events
        self._channel_start: float | None = None
        self._channel_last = 0.0

    @classmethod
    async def open(
        cls, url: str, *, tenant_max_events: int = DEFAULT_TENANT_MAX_EVENTS
    ) -> PostgresStore:
        with _reachable():
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=10,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={"application_name": "credential-broker"},
            )
            try:
                await migrate(pool)
            except BaseException:
                pool.terminate()
                raise
        return cls(url, pool, tenant_max_events=tenant_max_events)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy[Any]]:
        """A pooled connection for one call, which takes COMMAND_TIMEOUT at most in all. A
        connection that failed, timed out or was cancelled mid-call is dropped, not reused
        (nor waited for: asyncpg would wait for its query's cancellation to be answered)."""
        with _reachable():
            async with (
                asyncio.timeout(COMMAND_TIMEOUT),
                self._pool.acquire(timeout=CONNECT_TIMEOUT) as connection,
            ):
                try:
                    yield connection
                except _ABANDONED:
                    with contextlib.suppress(asyncpg.InterfaceError):  # the pool dropped it first
                        connection.terminate()
                    raise

    def channel_alive(self) -> tuple[float, float] | None:
        if self._channel_start is None:
            return None
        return (self._channel_start, self._channel_last)

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
        deleted: list[str] = []
        columns = COLUMNS.split(", ")
        # READ COMMITTED whatever the database's default: a writer that waited for another's
        # row lock then sees the version that one committed, and fails StoreConflict (retried)
        # rather than a serialization error.
        async with self._connection() as db, db.transaction(isolation="read_committed"):
            # The write itself checks the version, so two writers can never both succeed; the
            # role's unique index, that two tenants never hold one role. So the saves of one
            # tenant that commit do so one after another, each begun after the one before it
            # committed (it read that version), on whichever replica: retention's read of the
            # newest event, its merge, count and prune see every event committed before.
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
                deleted = await self._store_event(db, event)
            await db.execute("SELECT pg_notify($1, $2)", CHANNEL, connection.tenant_id)
        retention.pruned(connection.tenant_id, deleted)
        return saved

    async def _store_event(self, db: Any, event: Event) -> list[str]:
        """Insert `event`, or fold it into the tenant's newest row; then delete the tenant's
        rows past the bound (store/retention.py), and return their kinds. Inside `save`'s
        transaction, after the connection was written."""
        row = event_row(event)
        newest = await db.fetchrow(_NEWEST, event.tenant_id, event.tenant_id)
        kept = 0 if newest is None else newest[6]
        if newest is not None and retention.repeats(newest, event):
            await db.execute(_MERGE, row[2], row[3], row[4], row[6], newest[0])
        else:
            await db.execute(
                f"INSERT INTO connection_events ({EVENT_COLUMNS}) "  # noqa: S608 - constant
                "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                *row,
            )
            kept += 1
        if kept <= self._max_events:
            return []
        values = retention.prune_values(event.tenant_id, kept - self._max_events)
        return [deleted["kind"] for deleted in await db.fetch(_PRUNE, *values)]

    async def count_by_status(self) -> dict[str, int]:
        async with self._connection() as db:
            rows = await db.fetch("SELECT status, count(*) FROM connections GROUP BY status")
        return {row[0]: row[1] for row in rows}

    async def listen(
        self,
        on_change: Callable[[str], None],
        on_missed: Callable[[], None],
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        """Until cancelled. Whatever ends a listening connection, or keeps one from being made,
        is logged, reported to `on_error`, and the listener comes back: at once after losing
        a connection that was listening, else after a pause that doubles (RELISTEN_BACKOFF_MAX
        at most)."""
        first = True
        pause = 0.0
        while True:
            stretch = self._channel_start
            try:
                with _reachable():
                    await self._listen_once(on_change, (lambda: None) if first else on_missed)
            except Exception as exc:  # it always raises (but when cancelled): come back
                first = False
                if self._channel_start != stretch:  # it was listening: the connection was lost
                    pause = 0.0
                extra = {"error": str(exc) or type(exc).__name__, "retry_in": pause}
                if isinstance(exc, StoreUnavailable):
                    log.warning("not listening for changes; retrying", extra=extra)
                else:  # a bug: its traceback, and the listener comes back all the same
                    log.error("not listening for changes; retrying", exc_info=exc, extra=extra)
                on_error()
            await asyncio.sleep(pause)
            pause = min(max(pause * 2, 0.5), RELISTEN_BACKOFF_MAX)

    async def _listen_once(
        self, on_change: Callable[[str], None], on_listening: Callable[[], None]
    ) -> None:
        """Listen on one connection until it is lost or stops answering pings; always raises.
        From LISTEN on, each ping answered (as of when it was sent) and each notification
        received is a proof of life of the channel (`channel_alive`)."""
        listener = await asyncpg.connect(
            self._url,
            timeout=CONNECT_TIMEOUT,
            command_timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": LISTENER_NAME},
        )
        lost = asyncio.Event()
        listener.add_termination_listener(lambda _: lost.set())

        def notified(*args: Any) -> None:
            self._channel_last = time.monotonic()
            on_change(args[3])

        try:
            await listener.add_listener(CHANNEL, notified)
            self._channel_start = self._channel_last = time.monotonic()
            log.info("listening for changes")
            on_listening()
            while not lost.is_set():  # a dropped socket is noticed by the next query
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), timeout=LISTENER_PING_INTERVAL)
                if not lost.is_set():
                    # Once answered, every notification committed before it was sent is in.
                    sent = time.monotonic()
                    await listener.execute("SELECT 1", timeout=LISTENER_PING_TIMEOUT)
                    self._channel_last = max(self._channel_last, sent)
        finally:
            listener.terminate()
        raise StoreUnavailable("the database is unavailable (the listening connection was lost)")

    async def close(self) -> None:
        """Close the pool; what is still in use after CONNECT_TIMEOUT (a hung database) is
        dropped instead of waited for."""
        try:
            await asyncio.wait_for(self._pool.close(), CONNECT_TIMEOUT)
        except UNREACHABLE:
            self._pool.terminate()


async def migrate(pool: asyncpg.Pool) -> int:
    """Apply the migrations not yet applied; safe when replicas start at once (an advisory
    lock lets one migrate while the others wait). Returns the schema version."""
    async with pool.acquire(timeout=CONNECT_TIMEOUT) as db, db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await db.execute("CREATE TABLE IF NOT EXISTS broker_schema (version INTEGER NOT NULL)")
        current = await db.fetchval("SELECT max(version) FROM broker_schema") or 0
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            await db.execute(script)
            await db.execute("INSERT INTO broker_schema VALUES ($1)", number)
        await _backfill_role_keys(db)
        return len(MIGRATIONS)


async def _backfill_role_keys(db: Any) -> None:
    """Give rows stored before role keys existed theirs. Where two tenants held one role from
    before (something only an older broker let happen), the one met second no longer holds it:
    it goes back to PENDING and must verify again, and the log names it."""
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
            await db.execute(
                "UPDATE connections SET status = 'PENDING', version = version + 1 "
                "WHERE tenant_id = $1",
                tenant_id,
            )
            log.error(
                "two tenants held one role; this one is PENDING now and must verify again",
                extra={"tenant": tenant_id, "role_arn": role_arn},
            )
