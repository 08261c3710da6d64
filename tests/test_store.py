"""The store contract, on SQLite and on PostgreSQL alike: optimistic concurrency, external IDs
never reused, data kept across reopening, migrations that replicas may run at once."""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.models import Check, Connection, Status
from broker.store import StoreConflict, open_store


def pending(tenant: str = "t", external_id: str = "e" * 32) -> Connection:
    return Connection(tenant, Status.PENDING, external_id, "us-east-1", datetime.now(UTC))


async def test_save_get_and_lost_update_refused(database_url: str) -> None:
    store = await open_store(database_url)
    saved = await store.save(pending(), new_external_id=True)
    assert saved.version == 1
    active = replace(saved, status=Status.ACTIVE, checks=(Check("c", True, "ok"),))
    await store.save(active, new_external_id=False)
    with pytest.raises(StoreConflict):
        await store.save(replace(saved, status=Status.DISCONNECTED), new_external_id=False)
    assert await store.get("t") == replace(active, version=2)
    assert await store.get("other") is None
    await store.close()


async def test_two_writers_of_a_new_tenant_one_wins(database_url: str) -> None:
    store = await open_store(database_url)
    results = await asyncio.gather(
        *(
            store.save(pending("t", f"external-id-{i:020d}"), new_external_id=True)
            for i in range(10)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Connection)]
    assert len(winners) == 1
    assert all(isinstance(r, StoreConflict) for r in results if r not in winners)
    assert await store.get("t") == winners[0]
    await store.close()


async def test_an_external_id_is_never_used_twice(database_url: str) -> None:
    store = await open_store(database_url)
    await store.save(pending("a", "same-external-id-000000000000000"), new_external_id=True)
    with pytest.raises(StoreConflict):
        await store.save(pending("b", "same-external-id-000000000000000"), new_external_id=True)
    assert await store.get("b") is None, "nothing of the refused save was kept"
    await store.close()


async def test_reopen_keeps_data_and_migrating_twice_at_once_is_safe(database_url: str) -> None:
    stores = await asyncio.gather(*(open_store(database_url) for _ in range(3)))
    await stores[0].save(pending(), new_external_id=True)
    for store in stores:
        await store.close()
    again = await open_store(database_url)
    stored = await again.get("t")
    await again.close()
    assert stored is not None
    assert stored.status is Status.PENDING


async def test_sqlite_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = await open_store(f"sqlite:///{path}")
    await store.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
