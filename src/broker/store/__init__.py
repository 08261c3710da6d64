"""Where connections live (never credentials). `open_store` picks the implementation by URL:
`sqlite:///PATH` (one replica) or `postgresql://…` (several replicas, which hear each other's
changes through `listen`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from broker.config import DEFAULT_TENANT_MAX_EVENTS, ConfigError
from broker.errors import Aborted, Unavailable
from broker.models import Connection, Event

# The bound must leave room beyond the newest event of each kind, which retention never
# deletes (BROKER_TENANT_MAX_EVENTS has the same floor).
MIN_TENANT_MAX_EVENTS = 10


class StoreConflict(Aborted):
    """Another writer changed the connection since it was read; read again and retry."""


class RoleInUse(StoreConflict):
    """The role is already held (ACTIVE or SUSPENDED) by another tenant's connection."""


class StoreUnavailable(Unavailable):
    """The store cannot be reached right now; retryable."""


class ConnectionStore(Protocol):
    """Connections by tenant, with optimistic concurrency on `Connection.version`."""

    async def get(self, tenant_id: str) -> Connection | None:
        """The tenant's connection, or None."""
        ...

    async def save(
        self, connection: Connection, *, new_external_id: bool, event: Event | None = None
    ) -> Connection:
        """Store `connection` if the stored version is still `connection.version` (0: none
        stored). Returns it with the next version. With `new_external_id`, the external ID is
        recorded as used and must never have been used before. Raises StoreConflict otherwise,
        and RoleInUse when another tenant's connection holds the same role (rows.role_key).
        `event` is stored in the same transaction, under the retention rule (store/retention.py:
        a repeat of the tenant's newest event is folded into it; past the tenant's bound its
        oldest events go, link_changed first). Every replica listening is told the tenant
        changed."""
        ...

    async def role_holder(self, role_arn: str) -> str | None:
        """The tenant whose connection holds `role_arn` (ACTIVE or SUSPENDED), or None."""
        ...

    async def events(self, tenant_id: str, limit: int) -> list[Event]:
        """The tenant's most recent events, newest first (a row that stands for repeats is
        the latest of them)."""
        ...

    async def listen(
        self,
        on_change: Callable[[str], None],
        on_missed: Callable[[], None],
        on_error: Callable[[], None] = ...,
    ) -> None:
        """Until cancelled: call `on_change(tenant_id)` for every change another replica saves,
        and `on_missed()` after an interruption in which changes may have been missed. It never
        gives up: each failure (connection lost or not made, whatever the exception) is logged
        and reported to `on_error()`, and it listens again."""
        ...

    def channel_alive(self) -> tuple[float, float] | None:
        """The most recent unbroken stretch of the change-notification channel, as (start, last
        proof of life) in `time.monotonic()` seconds; None if it has never been up. While the
        channel is up the end advances every few seconds (PostgreSQL: every
        LISTENER_PING_INTERVAL, and on each notification); once it breaks, the pair stays as
        it was until a new stretch starts. A stretch vouches for every change saved between
        its start and its end having been heard."""
        ...

    async def count_by_status(self) -> dict[str, int]:
        """How many connections are in each status (for the metrics)."""
        ...

    async def close(self) -> None: ...


async def open_store(
    database_url: str, *, tenant_max_events: int = DEFAULT_TENANT_MAX_EVENTS
) -> ConnectionStore:
    """The store for `database_url`, its schema migrated to the latest version, keeping
    `tenant_max_events` events per tenant at most (BROKER_TENANT_MAX_EVENTS)."""
    if tenant_max_events < MIN_TENANT_MAX_EVENTS:
        raise ConfigError(
            f"BROKER_TENANT_MAX_EVENTS must be at least {MIN_TENANT_MAX_EVENTS}, "
            f"not {tenant_max_events}"
        )
    if database_url.startswith(("postgresql://", "postgres://")):
        from broker.store.postgres import PostgresStore

        return await PostgresStore.open(database_url, tenant_max_events=tenant_max_events)
    from broker.store.sqlite import SqliteStore

    return SqliteStore(database_url.removeprefix("sqlite:///"), tenant_max_events=tenant_max_events)
