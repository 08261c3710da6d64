"""Where connections live (never credentials). `open_store` picks the implementation by URL."""

from __future__ import annotations

from typing import Protocol

from broker.errors import Aborted
from broker.models import Connection


class StoreConflict(Aborted):
    """Another writer changed the connection since it was read; read again and retry."""


class ConnectionStore(Protocol):
    """Connections by tenant, with optimistic concurrency on `Connection.version`."""

    async def get(self, tenant_id: str) -> Connection | None:
        """The tenant's connection, or None."""
        ...

    async def save(self, connection: Connection, *, new_external_id: bool) -> Connection:
        """Store `connection` if the stored version is still `connection.version` (0: none
        stored). Returns it with the next version. With `new_external_id`, the external ID is
        recorded as used and must never have been used before. Raises StoreConflict otherwise."""
        ...

    async def close(self) -> None: ...


def open_store(database_url: str) -> ConnectionStore:
    from broker.store.sqlite import SqliteStore

    return SqliteStore(database_url.removeprefix("sqlite:///"))
