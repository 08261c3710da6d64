"""The SQLite store: optimistic concurrency, external IDs never reused, schema on reopen."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.models import Check, Connection, Status
from broker.store import StoreConflict
from broker.store.sqlite import SqliteStore


def pending(tenant: str = "t", external_id: str = "e" * 32) -> Connection:
    return Connection(tenant, Status.PENDING, external_id, "us-east-1", datetime.now(UTC))


async def test_save_get_and_lost_update_refused(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "db"))
    saved = await store.save(pending(), new_external_id=True)
    assert saved.version == 1
    active = replace(saved, status=Status.ACTIVE, checks=(Check("c", True, "ok"),))
    await store.save(active, new_external_id=False)
    with pytest.raises(StoreConflict):
        await store.save(replace(saved, status=Status.DISCONNECTED), new_external_id=False)
    assert await store.get("t") == replace(active, version=2)
    assert await store.get("other") is None
    await store.close()


async def test_an_external_id_is_never_used_twice(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "db"))
    await store.save(pending("a", "same-external-id-000000000000000"), new_external_id=True)
    with pytest.raises(StoreConflict):
        await store.save(pending("b", "same-external-id-000000000000000"), new_external_id=True)
    await store.close()


async def test_reopen_keeps_data_and_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = SqliteStore(str(path))
    await store.save(pending(), new_external_id=True)
    await store.close()
    again = SqliteStore(str(path))
    stored = await again.get("t")
    await again.close()
    assert stored is not None
    assert stored.status is Status.PENDING
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
