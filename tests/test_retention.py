"""Event retention (store/retention.py), on SQLite and on PostgreSQL: repeats compact, each
tenant keeps BROKER_TENANT_MAX_EVENTS events at most, link_changed go before the audit trail.
What the API shows is checked through gRPC, what the store holds by reading the database."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from broker.config import ConfigError
from broker.emulator import Identity, LocalAws
from broker.models import Check, Connection, Event, Status
from broker.store import ConnectionStore, StoreConflict, open_store, retention
from broker.store import postgres as postgres_store
from broker.store import sqlite as sqlite_store
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running, connect, settings_for, start_broker

REGIONS = ("eu-west-1", "us-east-1")
# Roles nobody created: VerifyRole fails on them, the same way every time.
MISSING_ROLES = tuple(f"arn:aws:iam::222222222222:role/never-created-{n}" for n in "ab")


async def sql(database_url: str, statement: str, *values: Any) -> list[tuple[Any, ...]]:
    """Run `statement` (with `?` placeholders) on the store's database itself; its rows."""
    if database_url.startswith("sqlite:///"):
        path = database_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            return [tuple(row) for row in db.execute(statement, values).fetchall()]
    pg = await asyncpg.connect(database_url)
    try:
        return [tuple(row) for row in await pg.fetch(retention.numbered(statement), *values)]
    finally:
        await pg.close()


async def stored(database_url: str, tenant: str) -> list[tuple[Any, ...]]:
    """The tenant's event rows as the database holds them, oldest first:
    (kind, repeats, external_id, role_arn)."""
    return await sql(
        database_url,
        "SELECT kind, repeats, external_id, role_arn FROM connection_events "
        "WHERE tenant_id = ? ORDER BY id",
        tenant,
    )


async def count_stored(database_url: str, tenant: str) -> int:
    """How many event rows the tenant has in the database (a schema of any version)."""
    query = "SELECT count(*) FROM connection_events WHERE tenant_id = ?"
    return int((await sql(database_url, query, tenant))[0][0])


async def listed(running: Running, tenant: str) -> list[pb.ConnectionEvent]:
    """ListConnectionEvents, as many as it gives (100), newest first."""
    answer = await running.stub.ListConnectionEvents(
        pb.ListConnectionEventsRequest(tenant_id=tenant, page_size=100)
    )
    return list(answer.events)


@pytest.fixture
async def small_bound(
    broker_settings: dict[str, Any], broker_identity: Identity
) -> AsyncIterator[Running]:
    """A broker keeping 10 events per tenant (the least BROKER_TENANT_MAX_EVENTS takes), whose
    VerifyRole gives up on a role AWS refuses at once."""
    overrides = broker_settings | {"tenant_max_events": 10, "verify_wait": 0.0}
    async with start_broker(overrides, broker_identity) as started:
        yield started


async def test_a_thousand_region_toggles_keep_one_link_changed(
    running: Running, tenant: str
) -> None:
    """The issue's case: 1,000 region changes of a PENDING connection are one link_changed
    row (counting them), after the created event, in the API and in the database."""
    create = pb.CreateConnectionRequest(tenant_id=tenant, region="us-east-1")
    created = (await running.stub.CreateConnection(create)).connection
    for i in range(1000):
        toggled = await running.stub.CreateConnection(
            pb.CreateConnectionRequest(tenant_id=tenant, region=REGIONS[i % 2])
        )
        assert toggled.connection.external_id == created.external_id
    assert await count_stored(running.database_url, tenant) == 2
    assert [e.kind for e in await listed(running, tenant)] == ["link_changed", "created"]
    assert [row[:2] for row in await stored(running.database_url, tenant)] == [
        ("created", 1),
        ("link_changed", 1000),
    ]


async def test_past_the_bound_link_changed_go_first_then_the_oldest_audit_events(
    small_bound: Running, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Five rounds of connect (created), move the link (link_changed), disconnect: 15 events,
    10 kept. The link changes went first, all but the newest, while older audit events stayed;
    then the oldest audit event, and a warning says so."""
    caplog.set_level(logging.WARNING, logger="broker.store.retention")
    stub = small_bound.stub
    ids = []
    for round_ in range(5):
        create = pb.CreateConnectionRequest(tenant_id=tenant, region="us-east-1")
        ids.append((await stub.CreateConnection(create)).connection.external_id)
        await stub.CreateConnection(
            pb.CreateConnectionRequest(tenant_id=tenant, region="eu-west-1")
        )
        await stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
        if round_ == 3:  # 12 events: two link changes went, no audit event
            assert [row[0] for row in await stored(small_bound.database_url, tenant)] == [
                "created", "disconnected", "created", "disconnected",
                "created", "link_changed", "disconnected",
                "created", "link_changed", "disconnected",
            ]  # fmt: skip
            assert caplog.records == []  # link changes go silently
    assert await count_stored(small_bound.database_url, tenant) == 10
    expected = [
        ("disconnected", ids[0]),
        ("created", ids[1]), ("disconnected", ids[1]),
        ("created", ids[2]), ("disconnected", ids[2]),
        ("created", ids[3]), ("disconnected", ids[3]),
        ("created", ids[4]), ("link_changed", ids[4]), ("disconnected", ids[4]),
    ]  # fmt: skip
    rows = await stored(small_bound.database_url, tenant)
    assert [(kind, external_id) for kind, _, external_id, _ in rows] == expected
    events = await listed(small_bound, tenant)
    assert [(e.kind, e.external_id) for e in events] == expected[::-1]
    [warning] = caplog.records
    assert (warning.levelname, warning.tenant, warning.deleted) == (  # type: ignore[attr-defined]
        "WARNING",
        tenant,
        {"created": 1},
    )


async def test_repeated_verification_failures_compact_and_the_current_created_stays(
    small_bound: Running, tenant: str
) -> None:
    """VerifyRole failing the same way again and again is one verification_failed row with a
    count. Failures that differ each time (two roles in turn) are each kept, up to the bound,
    and never push out the connection's created event (the newest of each kind stays)."""
    stub = small_bound.stub
    await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))

    async def verify(role_arn: str) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    for _ in range(12):
        await verify(MISSING_ROLES[0])
    assert [row[:2] for row in await stored(small_bound.database_url, tenant)] == [
        ("created", 1),
        ("verification_failed", 12),
    ]
    for i in range(12):
        await verify(MISSING_ROLES[(i + 1) % 2])
    rows = await stored(small_bound.database_url, tenant)
    assert len(rows) == 10
    assert rows[0][0] == "created"
    assert [row[3] for row in rows[1:]] == [MISSING_ROLES[(i + 1) % 2] for i in range(3, 12)]
    events = await listed(small_bound, tenant)
    assert [e.kind for e in events] == ["verification_failed"] * 9 + ["created"]
    assert events[0].role_arn == MISSING_ROLES[0]


async def test_two_replicas_toggling_one_tenant_keep_one_link_changed(
    local_aws: LocalAws,
    broker_identity: Identity,
    template_url: str,
    postgres_url: str,
    tenant: str,
) -> None:
    """Two brokers on one PostgreSQL move one tenant's link at once: still one link_changed
    row after the created event."""
    settings = settings_for(postgres_url, local_aws, template_url)
    async with (
        start_broker(settings, broker_identity) as one,
        start_broker(settings, broker_identity) as two,
    ):
        await one.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))

        async def toggle(running: Running, offset: int) -> None:
            for i in range(100):
                region = REGIONS[(i + offset) % 2]
                request = pb.CreateConnectionRequest(tenant_id=tenant, region=region)
                try:
                    await running.stub.CreateConnection(request)
                except grpc.aio.AioRpcError as lost:  # the other won every retry: call again
                    if lost.code() != grpc.StatusCode.ABORTED:
                        raise

        await asyncio.gather(toggle(one, 0), toggle(two, 1))
        assert await count_stored(postgres_url, tenant) == 2
        assert [e.kind for e in await listed(two, tenant)] == ["link_changed", "created"]


CHECKS = (Check("role_arn_format", True, "ok"), Check("assume_role_with_external_id", False, "no"))


def event(connection: Connection, kind: str, actor: str, role_arn: str = "") -> Event:
    checks = CHECKS if kind == "verification_failed" else ()
    return Event(
        connection.tenant_id, kind, datetime.now(UTC), actor, role_arn, connection.external_id,
        checks,
    )  # fmt: skip


class Writer:
    """One replica's store writing a tenant's events, retrying each save it loses to the
    other: a distinct verification_failed, then a link change, in turn. Records what it
    stored."""

    def __init__(self, store: ConnectionStore, tenant: str, name: str) -> None:
        self.store, self.tenant, self.name = store, tenant, name
        self.audit_roles: list[str] = []  # the verification_failed events stored, by role
        self.toggles = 0  # the link_changed events stored

    async def run(self, rounds: int) -> None:
        for i in range(rounds):
            while True:
                current = await self.store.get(self.tenant)
                assert current is not None
                if i % 2:
                    changed = replace(current, region=REGIONS[current.region == REGIONS[0]])
                    written = event(changed, "link_changed", self.name)
                else:
                    changed = replace(current, checks=CHECKS)
                    role = f"arn:aws:iam::222222222222:role/{self.name}-{i}"
                    written = event(changed, "verification_failed", self.name, role)
                try:
                    await self.store.save(changed, new_external_id=False, event=written)
                except StoreConflict:
                    continue
                if i % 2:
                    self.toggles += 1
                else:
                    self.audit_roles.append(role)
                break


async def race(database_url: str, bound: int, rounds: int) -> tuple[list[Writer], int]:
    """Two stores (two replicas) write one tenant's events at once while a third reader
    counts the tenant's rows. Returns the writers and the most rows ever counted."""
    stores = [await open_store(database_url, tenant_max_events=bound) for _ in range(2)]
    try:
        first = Connection("racer", Status.PENDING, "r" * 32, REGIONS[0], datetime.now(UTC))
        await stores[0].save(first, new_external_id=True, event=event(first, "created", "setup"))
        writers = [Writer(store, "racer", f"replica-{i}") for i, store in enumerate(stores)]
        most = 0

        async def watch(runs: list[asyncio.Task[None]]) -> None:
            nonlocal most
            while not all(run.done() for run in runs):
                most = max(most, await count_stored(database_url, "racer"))
                await asyncio.sleep(0.001)  # SQLite's count does not wait on the loop

        async with asyncio.TaskGroup() as tasks:  # one failing cancels the others
            runs = [tasks.create_task(writer.run(rounds)) for writer in writers]
            tasks.create_task(watch(runs))
        return writers, max(most, await count_stored(database_url, "racer"))
    finally:
        for store in stores:
            await store.close()


async def test_two_writers_at_once_lose_no_event(database_url: str) -> None:
    """Within the bound nothing is lost to compaction racing: every audit event either
    replica stored is there once, every link change is counted in a link_changed row, and no
    two link_changed rows are neighbours."""
    writers, _ = await race(database_url, 1000, 60)
    rows = await stored(database_url, "racer")
    kinds = [row[0] for row in rows]
    assert ("link_changed", "link_changed") not in set(itertools.pairwise(kinds))
    audit = sorted(role for kind, _, _, role in rows if kind == "verification_failed")
    assert audit == sorted(writers[0].audit_roles + writers[1].audit_roles)
    assert len(audit) == 60
    assert sum(n for kind, n, _, _ in rows if kind == "link_changed") == 60
    assert kinds[0] == "created"


async def test_two_writers_at_once_never_pass_the_bound(database_url: str) -> None:
    """Past the bound, with both replicas writing: never more than 10 rows seen; kept, the
    created event (the newest of its kind), the newest link change, and the 8 newest audit
    events (of each replica, the last it stored)."""
    writers, most = await race(database_url, 10, 40)
    rows = await stored(database_url, "racer")
    assert most == 10
    assert [row[0] for row in rows] == ["created"] + ["verification_failed"] * 8 + ["link_changed"]
    kept = [row[3] for row in rows[1:-1]]
    for writer in writers:
        mine = [role for role in kept if role in writer.audit_roles]
        assert mine == writer.audit_roles[len(writer.audit_roles) - len(mine) :]


async def _old_schema(database_url: str) -> None:
    """The database as the broker before retention left it: every migration but the last."""
    if database_url.startswith("sqlite:///"):
        path = database_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as db:
            for script in sqlite_store.MIGRATIONS[:-1]:
                db.executescript(script)
            db.execute(f"PRAGMA user_version = {len(sqlite_store.MIGRATIONS) - 1}")
        return
    pg = await asyncpg.connect(database_url)
    try:
        await pg.execute("CREATE TABLE broker_schema (version INTEGER NOT NULL)")
        for number, script in enumerate(postgres_store.MIGRATIONS[:-1], start=1):
            await pg.execute(script)
            await pg.execute("INSERT INTO broker_schema VALUES ($1)", number)
    finally:
        await pg.close()


async def test_events_stored_before_retention_are_compacted_when_migrating(
    database_url: str,
) -> None:
    """An older broker's run of link changes becomes one row counting them and keeping when
    the run began; the audit events between runs stay as they were."""
    await _old_schema(database_url)
    on_sqlite = database_url.startswith("sqlite:///")
    start = datetime(2025, 1, 1, tzinfo=UTC)

    def minute(n: int) -> datetime:
        return start + timedelta(minutes=n)

    kinds = ["created"] + ["link_changed"] * 5 + ["verified"] + ["link_changed"] * 3
    rows = [("legacy", kind, minute(i)) for i, kind in enumerate(kinds)]
    for tenant, kind, at in [*rows, ("other", "link_changed", start)]:
        await sql(
            database_url,
            "INSERT INTO connection_events (tenant_id, kind, at, actor, role_arn, external_id, "
            "checks) VALUES (?, ?, ?, 'ui', '', 'x', '[]')",
            tenant,
            kind,
            at.isoformat() if on_sqlite else at,
        )
    store = await open_store(database_url)
    try:
        events = await store.events("legacy", 100)
    finally:
        await store.close()
    assert [row[:2] for row in await stored(database_url, "legacy")] == [
        ("created", 1),
        ("link_changed", 5),
        ("verified", 1),
        ("link_changed", 3),
    ]
    assert [(e.kind, e.at) for e in events] == [
        ("link_changed", minute(9)),
        ("verified", minute(6)),
        ("link_changed", minute(5)),
        ("created", start),
    ]
    assert [row[:2] for row in await stored(database_url, "other")] == [("link_changed", 1)]
    query = "SELECT first_at FROM connection_events WHERE tenant_id = ? ORDER BY id"
    first_at = [at for (at,) in await sql(database_url, query, "legacy")]
    if on_sqlite:
        first_at = [at and datetime.fromisoformat(at) for at in first_at]
    assert first_at == [None, minute(1), None, minute(7)]


async def test_a_bound_too_small_to_keep_each_kind_is_refused(database_url: str) -> None:
    with pytest.raises(ConfigError, match="BROKER_TENANT_MAX_EVENTS must be at least 10"):
        await open_store(database_url, tenant_max_events=9)


async def test_a_database_defaulting_to_serializable_changes_nothing(postgres_url: str) -> None:
    """A save states its isolation: a database whose default is SERIALIZABLE still has a lost
    race end in StoreConflict (retried), not a serialization failure, and keeps the bound."""
    db = await asyncpg.connect(postgres_url)
    try:
        name = await db.fetchval("SELECT current_database()")
        await db.execute(
            f'ALTER DATABASE "{name}" SET default_transaction_isolation = serializable'
        )
    finally:
        await db.close()
    _, most = await race(postgres_url, 10, 30)
    assert most == 10


async def test_failed_verifications_never_push_a_tenants_earlier_role_out_of_its_trail(
    small_bound: Running, local_aws: LocalAws, tenant: str
) -> None:
    """Past the bound, verification_failed rows (audit events that changed nothing) go before
    created, verified and disconnected: a run of failed VerifyRole calls, each cheap to make,
    cannot push the tenant's earlier role (its first verified event) out of its trail."""
    stub = small_bound.stub
    first = (await connect(small_bound, local_aws, tenant)).role_arn
    await stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
    second = (await connect(small_bound, local_aws, tenant)).role_arn
    for i in range(12):  # two roles in turn: no two in a row compact
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.VerifyRole(
                pb.VerifyRoleRequest(tenant_id=tenant, role_arn=MISSING_ROLES[i % 2])
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    rows = [
        (kind, role_arn) for kind, _, _, role_arn in await stored(small_bound.database_url, tenant)
    ]
    assert rows[:5] == [
        ("created", ""),
        ("verified", first),
        ("disconnected", first),
        ("created", ""),
        ("verified", second),
    ]
    assert rows[5:] == [("verification_failed", MISSING_ROLES[i % 2]) for i in range(7, 12)]
