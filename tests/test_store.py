"""The store contract, on SQLite and on PostgreSQL alike: optimistic concurrency, external IDs
never reused, data kept across reopening, migrations that replicas may run at once."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from broker.models import Check, Connection, Status
from broker.store import RoleInUse, StoreConflict, open_store
from broker.store import postgres as postgres_store
from broker.store import sqlite as sqlite_store
from broker.store.rows import COLUMNS, to_row
from tests.conftest import captured_logs


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


def holding(tenant: str, role_arn: str, status: Status = Status.ACTIVE) -> Connection:
    return replace(
        pending(tenant, f"{tenant}-external-id".ljust(32, "x")), status=status, role_arn=role_arn
    )


ROLE = "arn:aws:iam::222222222222:role/credential-broker-acme"


@pytest.mark.parametrize(
    "look_alike",
    [
        ROLE,
        "arn:aws:iam::222222222222:role/CREDENTIAL-BROKER-ACME",  # IAM names ignore case
        "arn:aws:iam::222222222222:role/some/path/credential-broker-acme",  # and the path
    ],
)
async def test_one_role_is_held_by_one_tenant(database_url: str, look_alike: str) -> None:
    """A role ACTIVE (or SUSPENDED) for one tenant cannot be ACTIVE for another, under any of
    the names IAM takes for it; once the first lets go (DISCONNECTED), it is free."""
    store = await open_store(database_url)
    first = await store.save(pending("first", "1" * 32), new_external_id=True)
    first = await store.save(
        replace(first, status=Status.ACTIVE, role_arn=ROLE), new_external_id=False
    )
    second = await store.save(pending("second", "2" * 32), new_external_id=True)
    assert await store.role_holder(look_alike) == "first"
    with pytest.raises(RoleInUse):
        await store.save(
            replace(second, status=Status.ACTIVE, role_arn=look_alike), new_external_id=False
        )
    assert (await store.get("second")) == second, "nothing of the refused save was kept"
    assert (await store.get("first")) == first, "and the holder's row is untouched"
    suspended = await store.save(replace(first, status=Status.SUSPENDED), new_external_id=False)
    with pytest.raises(RoleInUse):
        await store.save(
            replace(second, status=Status.ACTIVE, role_arn=look_alike), new_external_id=False
        )
    await store.save(replace(suspended, status=Status.DISCONNECTED), new_external_id=False)
    assert await store.role_holder(look_alike) is None
    await store.save(
        replace(second, status=Status.ACTIVE, role_arn=look_alike), new_external_id=False
    )
    assert await store.role_holder(ROLE) == "second"
    await store.close()


async def test_two_replicas_racing_for_one_role_cannot_both_win(database_url: str) -> None:
    """Two stores (two replicas, on PostgreSQL) activate one role for two tenants at once:
    exactly one save stands."""
    stores = [await open_store(database_url) for _ in range(2)]
    tenants = [
        await stores[0].save(pending(f"racer-{i}", str(i) * 32), new_external_id=True)
        for i in range(2)
    ]
    results = await asyncio.gather(
        *(
            store.save(replace(t, status=Status.ACTIVE, role_arn=ROLE), new_external_id=False)
            for store, t in zip(stores, tenants, strict=True)
        ),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Connection) for r in results) == 1, results
    assert sum(isinstance(r, RoleInUse) for r in results) == 1, results
    active = [await stores[0].get(t.tenant_id) for t in tenants]
    assert [c.status for c in active if c is not None].count(Status.ACTIVE) == 1
    for store in stores:
        await store.close()


async def _schema_2_with(database_url: str, rows: list[Connection]) -> None:
    """A store as schema 2 left it (before role keys), holding `rows`."""
    values = [to_row(row, datetime.isoformat)[:-1] for row in rows]
    columns = COLUMNS.removesuffix(", role_key")
    if database_url.startswith("sqlite:///"):
        db = sqlite3.connect(database_url.removeprefix("sqlite:///"))
        for script in sqlite_store.MIGRATIONS[:2]:
            db.executescript(script)
        db.executemany(f"INSERT INTO connections ({columns}) VALUES ({','.join('?' * 11)})", values)
        db.execute("PRAGMA user_version = 2")
        db.commit()
        db.close()
        return
    db = await asyncpg.connect(database_url)
    try:
        await db.execute("CREATE TABLE broker_schema (version INTEGER NOT NULL)")
        for number, script in enumerate(postgres_store.MIGRATIONS[:2], start=1):
            await db.execute(script)
            await db.execute("INSERT INTO broker_schema VALUES ($1)", number)
        for row in rows:
            await db.execute(
                f"INSERT INTO connections ({columns}) VALUES "
                f"({', '.join(f'${i}' for i in range(1, 12))})",
                *to_row(row)[:-1],
            )
    finally:
        await db.close()


async def test_rows_from_before_role_keys_get_theirs(database_url: str) -> None:
    """Migrating a store that holds ACTIVE connections: each gets its role key, so the role is
    held from then on; of two tenants who already shared a role (only an older broker let
    that happen) one goes back to PENDING, and the log says so, rather than the migration
    failing or both staying ACTIVE."""
    rows = [
        holding("before", ROLE),
        holding("shared-1", "arn:aws:iam::222222222222:role/shared"),
        holding("shared-2", "arn:aws:iam::222222222222:role/Shared"),
    ]
    await _schema_2_with(database_url, rows)
    with captured_logs(logging.Formatter("%(message)s"), logging.ERROR) as log:
        store = await open_store(database_url)
    assert await store.role_holder(ROLE) == "before"
    assert await store.role_holder("arn:aws:iam::222222222222:role/shared") in {
        "shared-1",
        "shared-2",
    }
    assert "two tenants held one role" in log.getvalue()
    shared = [await store.get(t) for t in ("shared-1", "shared-2")]
    statuses = sorted(c.status.value for c in shared if c is not None)
    assert statuses == ["ACTIVE", "PENDING"], "the one met second holds it no more"
    newcomer = await store.save(pending("newcomer", "n" * 32), new_external_id=True)
    with pytest.raises(RoleInUse):
        await store.save(
            replace(newcomer, status=Status.ACTIVE, role_arn=ROLE), new_external_id=False
        )
    await store.close()


async def test_a_writer_that_knows_no_role_keys_cannot_take_a_held_role(postgres_url: str) -> None:
    """Mid rolling upgrade, a replica of an older version activates a role with an UPDATE that
    sets no role_key: PostgreSQL computes the key itself and refuses the second holder."""
    store = await open_store(postgres_url)
    await store.save(holding("holder", ROLE), new_external_id=True)
    await store.save(pending("old-writer", "o" * 32), new_external_id=True)
    db = await asyncpg.connect(postgres_url)
    try:
        with pytest.raises(asyncpg.UniqueViolationError):
            await db.execute(
                "UPDATE connections SET status = 'ACTIVE', role_arn = $1 WHERE tenant_id = $2",
                ROLE.replace("credential-broker-acme", "Credential-Broker-ACME"),
                "old-writer",
            )
    finally:
        await db.close()
    assert (await store.get("old-writer")).status is Status.PENDING  # type: ignore[union-attr]
    await store.close()
