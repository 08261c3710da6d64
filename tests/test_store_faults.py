"""One replica loses, or hangs on, PostgreSQL (through a TCP fault proxy, tests/tcpfaults.py)
while the database itself stays up for everyone else.

- Every way the database fails a call becomes StoreUnavailable, from one list
  (postgres.UNREACHABLE), on every public method, within a bound; conflicts stay conflicts.
- The listener and the re-check loops log, count and carry on, whatever fails, and changes
  made on another replica reach this one again once the database is back.
- `channel_alive` tells how long the change-notification channel has been unbroken.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest

from broker.emulator import Identity, LocalAws
from broker.metrics import BACKGROUND_LOOPS, Metrics
from broker.models import Connection, Status
from broker.store import RoleInUse, StoreConflict, StoreUnavailable, open_store
from broker.store import postgres as pg
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SqliteStore
from broker.sync import TenantSync
from broker.v1 import broker_pb2 as pb
from tests.conftest import POSTGRES_URL, connect, metrics_text, settings_for, start_broker
from tests.tcpfaults import PgProxy

ROLE = "arn:aws:iam::123456789012:role/broker-read"


def pending(tenant: str, external_id: str) -> Connection:
    return Connection(tenant, Status.PENDING, external_id, "us-east-1", datetime.now(UTC))


# Every public call of the store, on a store that already holds tenant "t".
CALLS: dict[str, Callable[[Any], Awaitable[object]]] = {
    "get": lambda store: store.get("t"),
    "save": lambda store: store.save(pending("new", "n" * 32), new_external_id=True),
    "events": lambda store: store.events("t", 10),
    "role_holder": lambda store: store.role_holder(ROLE),
    "count_by_status": lambda store: store.count_by_status(),
}


@pytest.fixture
def proxy() -> Iterator[PgProxy]:
    with PgProxy(urlsplit(POSTGRES_URL).port or 5432).start() as started:
        yield started


@pytest.fixture
async def admin(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the server's `postgres` database, to change the test database."""
    connection = await asyncpg.connect(postgres_url.rsplit("/", 1)[0] + "/postgres")
    yield connection
    await connection.close()


@pytest.fixture
async def store(postgres_url: str, proxy: PgProxy) -> AsyncIterator[PostgresStore]:
    """A store through the proxy, holding tenant "t" with ROLE."""
    opened = await PostgresStore.open(proxy.url_for(postgres_url))
    saved = await opened.save(pending("t", "e" * 32), new_external_id=True)
    await opened.save(replace(saved, status=Status.ACTIVE, role_arn=ROLE), new_external_id=False)
    yield opened
    proxy.mode = "pass"
    await opened.close()


async def unavailable(call: Awaitable[object], within: float, cause: str = "") -> float:
    """`call` raises StoreUnavailable within `within` s, naming the error class (`cause`, if
    given) and nothing of the URL. Returns how long it took."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        await asyncio.wait_for(call, within + 5)
    took = time.monotonic() - started
    message = str(raised.value)
    assert isinstance(raised.value.__cause__, pg.UNREACHABLE), repr(raised.value.__cause__)
    assert type(raised.value.__cause__).__name__ in message
    assert cause in message, message
    assert "broker_test" not in message, message
    assert "127.0.0.1" not in message, message
    assert took < within, f"{message} after {took:.2f} s"
    return took


async def cut_pool_connections(proxy: PgProxy) -> None:
    """Reset the store's pooled connections, so that its next call makes a new one."""
    proxy.mode = "reset"
    await asyncio.sleep(0.1)
    proxy.mode = "pass"


async def test_the_proxy_does_what_it_says(proxy: PgProxy, postgres_url: str) -> None:
    url = proxy.url_for(postgres_url)
    assert url.endswith(f"@127.0.0.1:{proxy.port}/{postgres_url.rsplit('/', 1)[1]}")
    kept = await asyncpg.connect(url)
    assert await kept.fetchval("SELECT 1") == 1
    assert proxy.open == 1

    proxy.mode = "hang"
    with pytest.raises(TimeoutError):
        await kept.fetchval("SELECT 1", timeout=0.3)
    with pytest.raises(TimeoutError):
        await asyncpg.connect(url, timeout=0.3)
    proxy.mode = "reset"
    assert proxy.counts["reset"] >= 2
    with pytest.raises(ConnectionResetError):
        await asyncpg.connect(url)
    proxy.mode = "refuse"
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(url)
    proxy.mode = "pass"
    again = await asyncpg.connect(url)
    await again.close()

    proxy.set("flap", every=0.2)
    outcomes: set[str] = set()
    started = time.monotonic()
    while time.monotonic() - started < 1.5:
        try:
            flapping = await asyncpg.connect(url, timeout=1)
            await flapping.close()
            outcomes.add("connected")
        except (OSError, asyncpg.PostgresConnectionError):
            outcomes.add("reset")
        await asyncio.sleep(0.05)
    assert outcomes == {"connected", "reset"}
    kept.terminate()


# -- every failure, one error ---------------------------------------------------------------


async def test_refused(store: PostgresStore, proxy: PgProxy, postgres_url: str) -> None:
    proxy.mode = "refuse"
    for name, call in CALLS.items():
        took = await unavailable(call(store), within=1.0)
        print(f"refused: {name} unavailable after {took * 1000:.0f} ms")
    await unavailable(PostgresStore.open(proxy.url_for(postgres_url)), 1.0, "Refused")
    proxy.mode = "pass"
    assert (await store.get("t")) is not None, "back by itself"


@pytest.mark.parametrize("name", CALLS)
async def test_reset_mid_query(store: PostgresStore, proxy: PgProxy, name: str) -> None:
    proxy.mode = "hang"  # the query goes out and is held in the proxy ...
    call = asyncio.ensure_future(CALLS[name](store))
    await asyncio.sleep(0.3)
    assert not call.done()
    proxy.mode = "reset"  # ... when the connection is reset under it
    await unavailable(call, within=1.0)
    proxy.mode = "pass"
    assert (await store.get("t")) is not None


async def test_hung_database_gives_unavailable_within_the_bound(
    store: PostgresStore, proxy: PgProxy, postgres_url: str
) -> None:
    """Packets swallowed: the call on the pooled connection is cut at COMMAND_TIMEOUT, calls
    needing a new connection at CONNECT_TIMEOUT, and calls queueing for the pool (more than
    its 10 connections) at CONNECT_TIMEOUT as well."""
    proxy.mode = "hang"
    calls = [call(store) for call in CALLS.values()] + [store.get("t") for _ in range(10)]
    bound = pg.COMMAND_TIMEOUT + 0.5
    took = await asyncio.gather(*(unavailable(call, bound) for call in calls))
    print(f"hung: unavailable after {min(took):.2f} to {max(took):.2f} s")
    assert max(took) >= pg.CONNECT_TIMEOUT - 0.1, "they did wait for an answer first"
    took_open = await unavailable(
        PostgresStore.open(proxy.url_for(postgres_url)), pg.CONNECT_TIMEOUT + 0.5, "Timeout"
    )
    print(f"hung: open unavailable after {took_open:.2f} s")
    proxy.mode = "pass"
    assert (await store.get("t")) is not None


async def test_too_many_connections(
    store: PostgresStore, proxy: PgProxy, admin: asyncpg.Connection, postgres_url: str
) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    await admin.execute(f'ALTER DATABASE "{database}" CONNECTION LIMIT 0')
    try:
        await cut_pool_connections(proxy)
        for call in CALLS.values():
            await unavailable(call(store), 1.0, "TooManyConnectionsError")
        await unavailable(PostgresStore.open(postgres_url), 1.0, "TooManyConnectionsError")
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" CONNECTION LIMIT -1')
    assert (await store.get("t")) is not None


async def test_database_not_accepting_connections_or_gone(
    store: PostgresStore, proxy: PgProxy, admin: asyncpg.Connection, postgres_url: str
) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    try:
        await cut_pool_connections(proxy)
        for call in CALLS.values():
            await unavailable(call(store), 1.0, "ObjectNotInPrerequisiteStateError")
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    await unavailable(open_store(postgres_url + "_gone"), 1.0, "InvalidCatalogNameError")


async def test_authentication_fails_after_a_restart(
    store: PostgresStore, proxy: PgProxy, postgres_url: str
) -> None:
    """The password the replica holds no longer works: at start-up, and when the database
    comes back from a restart (its connections cut) after the password was rotated."""
    wrong = postgres_url.replace("broker_test:broker_test@", "broker_test:not-the-password@")
    assert wrong != postgres_url
    message = str(await _raised(open_store(wrong)))
    assert "not-the-password" not in message
    assert "InvalidPasswordError" in message
    store._pool.set_connect_args(dsn=proxy.url_for(wrong))  # rotated under the running store
    await cut_pool_connections(proxy)
    for call in CALLS.values():
        await unavailable(call(store), 1.0, "InvalidPasswordError")


async def test_read_only_failover_target(
    store: PostgresStore, proxy: PgProxy, admin: asyncpg.Connection, postgres_url: str
) -> None:
    """Failed over to a server that cannot write: reads go on, writes are StoreUnavailable, and
    so is opening (it migrates); a URL asking for a writable server finds none."""
    database = postgres_url.rsplit("/", 1)[1]
    await admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    await cut_pool_connections(proxy)  # new sessions take the setting
    got = await store.get("t")
    assert got is not None
    assert got.status is Status.ACTIVE
    await unavailable(CALLS["save"](store), 1.0, "ReadOnlySQLTransactionError")
    await unavailable(
        store.save(replace(got, status=Status.DISCONNECTED), new_external_id=False),
        1.0,
        "ReadOnlySQLTransactionError",
    )
    await unavailable(open_store(postgres_url), 1.0, "ReadOnlySQLTransactionError")
    await unavailable(
        open_store(postgres_url + "?target_session_attrs=read-write"),
        1.0,
        "TargetServerAttributeNotMatched",
    )


async def test_another_operation_in_progress_and_a_fast_stop(
    store: PostgresStore, proxy: PgProxy, postgres_url: str
) -> None:
    """A connection still busy with a cancelled query, and calls under way when the store
    is closed: asyncpg's InterfaceError, mapped like the rest; closing never waits long."""
    busy = await asyncpg.connect(postgres_url)
    try:
        sleeping = asyncio.ensure_future(busy.execute("SELECT pg_sleep(0.5)"))
        await asyncio.sleep(0.1)
        with (
            pytest.raises(StoreUnavailable, match=r"\(InterfaceError\)") as raised,
            pg._reachable(),
        ):
            await busy.fetchval("SELECT 1")
        assert "another operation is in progress" in str(raised.value.__cause__)
        await sleeping
    finally:
        await busy.close()

    proxy.mode = "hang"
    under_way = [asyncio.ensure_future(call(store)) for call in CALLS.values()]
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await store.close()
    closed_after = time.monotonic() - started
    print(f"closed a hung store in {closed_after:.2f} s")
    assert closed_after < pg.CONNECT_TIMEOUT + 0.5
    for call in under_way:
        await unavailable(call, 1.0)
    await unavailable(store.get("t"), 1.0, "InterfaceError")  # the pool is closed


async def test_conflicts_stay_conflicts(store: PostgresStore) -> None:
    current = await store.get("t")
    assert current is not None
    with pytest.raises(StoreConflict) as stale:
        await store.save(replace(current, version=current.version - 1), new_external_id=False)
    assert not isinstance(stale.value, StoreUnavailable)
    other = await store.save(pending("u", "u" * 32), new_external_id=True)
    with pytest.raises(RoleInUse):
        await store.save(replace(other, status=Status.ACTIVE, role_arn=ROLE), new_external_id=False)
    with pytest.raises(StoreConflict):
        await store.save(pending("v", "u" * 32), new_external_id=True)  # a used external ID


async def _raised(call: Awaitable[object]) -> StoreUnavailable:
    with pytest.raises(StoreUnavailable) as raised:
        await call
    return raised.value


# -- channel_alive ------------------------------------------------------------------------------


async def wait_until(condition: Callable[[], bool], within: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, f"not {what} within {within} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.parametrize("fault", ["hang", "reset"])
async def test_channel_alive_follows_the_listening_connection(
    store: PostgresStore, proxy: PgProxy, postgres_url: str, fault: str
) -> None:
    assert store.channel_alive() is None, "never up yet"
    heard: list[str] = []
    errors: list[float] = []
    missed: list[float] = []

    def on_missed() -> None:
        missed.append(time.monotonic())
        if len(missed) == 1:
            raise RuntimeError("a bug in on_missed")  # the listener must outlive it too

    listening = asyncio.create_task(
        store.listen(heard.append, on_missed, lambda: errors.append(time.monotonic()))
    )
    try:
        await wait_until(lambda: store.channel_alive() is not None, 3, "listening")
        first = store.channel_alive()
        assert first is not None
        await asyncio.sleep(pg.LISTENER_PING_INTERVAL + 0.5)
        healthy = store.channel_alive()
        assert healthy is not None
        assert healthy[0] == first[0]
        assert healthy[1] > first[1]
        assert time.monotonic() - healthy[1] <= pg.LISTENER_PING_INTERVAL + 0.5

        other = await PostgresStore.open(postgres_url)  # another replica, not through the proxy
        try:
            current = await other.get("t")
            assert current is not None
            current = await other.save(current, new_external_id=False)
            await wait_until(lambda: heard == ["t"], 1.0, "notified")

            proxy.mode = fault
            cut = time.monotonic()
            noticed = await wait_until(lambda: bool(errors), 5, "noticed")
            print(f"{fault}: the listener noticed after {noticed:.2f} s")
            assert noticed <= 3.5, "within a few seconds, even when nothing answers"
            frozen = store.channel_alive()
            assert frozen is not None
            assert frozen[0] == first[0]
            assert frozen[1] <= cut
            await asyncio.sleep(2.0)  # the listener keeps failing meanwhile
            assert store.channel_alive() == frozen, "no proof of life while cut off"

            await other.save(current, new_external_id=False)  # a change it cannot hear
            failed = len(errors)
            proxy.mode = "pass"
            back = time.monotonic()
            took = await wait_until(
                lambda: (store.channel_alive() or (0.0, 0.0))[0] > back, 10, "listening again"
            )
            print(f"{fault}: a new stretch started {took:.2f} s after the database came back")
            await wait_until(lambda: bool(missed), 1.0, "told changes may have been missed")
            # on_missed raised: logged, counted, and it listens again
            await wait_until(lambda: len(missed) == 2, 10, "listening again after the bug")
            assert len(errors) > failed
            restarted = store.channel_alive()
            assert restarted is not None
            assert restarted[0] > frozen[1]
            await other.save(pending("w", "w" * 32), new_external_id=True)
            await wait_until(lambda: heard[-1:] == ["w"], 1.0, "notified again")
        finally:
            await other.close()
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)


async def test_channel_alive_on_sqlite(tmp_path: Path) -> None:
    before = time.monotonic()
    store = SqliteStore(str(tmp_path / "broker.db"))
    try:
        first = store.channel_alive()
        assert first is not None
        assert before <= first[0] <= first[1]
        await asyncio.sleep(0.05)
        later = store.channel_alive()
        assert later is not None
        assert later[0] == first[0]
        assert later[1] >= first[1] + 0.05
    finally:
        await store.close()


# -- the loops never die -------------------------------------------------------------------


class Held:
    """What a replica holds (the cache or the streams), as TenantSync sees it."""

    def __init__(self, grants: dict[str, tuple[str, str]]) -> None:
        self.grants = grants
        self.dropped: list[str] = []

    def tenants(self) -> list[str]:
        return list(self.grants)

    def grants_of(self, tenant_id: str) -> list[Any]:
        held = self.grants.get(tenant_id)
        return [] if held is None else [SimpleNamespace(role_arn=held[0], external_id=held[1])]

    def watching(self, tenant_id: str) -> bool:
        return tenant_id in self.grants

    def evict_tenant(self, tenant_id: str) -> None:
        self.dropped.append(tenant_id)
        self.grants.pop(tenant_id, None)

    wake_tenant = evict_tenant


class Breakable(SqliteStore):
    """A real store whose reads fail, while `broken` is set, with an exception nobody expects."""

    broken = False

    async def get(self, tenant_id: str) -> Connection | None:
        if self.broken:
            raise RuntimeError("unexpected")
        return await super().get(tenant_id)


def errors_of(metrics: Metrics, loop: str) -> float:
    value = metrics.registry.get_sample_value("broker_background_errors_total", {"loop": loop})
    assert value is not None
    return value


async def test_recheck_loops_outlive_unexpected_errors(tmp_path: Path) -> None:
    store = Breakable(str(tmp_path / "broker.db"))
    saved = await store.save(pending("t", "e" * 32), new_external_id=True)
    active = await store.save(
        replace(saved, status=Status.ACTIVE, role_arn=ROLE), new_external_id=False
    )
    cache, hub = Held({"t": (ROLE, "e" * 32)}), Held({})
    metrics = Metrics()
    sync = TenantSync(store, cache, hub, metrics=metrics)  # type: ignore[arg-type]
    reverified: list[str] = []

    async def recheck_role(tenant_id: str) -> None:
        reverified.append(tenant_id)
        if store.broken:
            raise RuntimeError("unexpected")

    loops = [
        asyncio.create_task(sync.recheck_forever(0.05)),
        asyncio.create_task(sync.reverify_forever(0.05, recheck_role)),
    ]
    try:
        store.broken = True
        sync.on_change("t")
        await wait_until(lambda: errors_of(metrics, "recheck") >= 3, 2, "re-checks failing")
        await wait_until(lambda: errors_of(metrics, "reverify") >= 3, 2, "re-verifies failing")
        assert errors_of(metrics, "change") == 1
        assert not any(loop.done() for loop in loops), "a loop died"
        assert cache.dropped == []

        store.broken = False
        await store.save(replace(active, status=Status.DISCONNECTED), new_external_id=False)
        await wait_until(lambda: cache.dropped == ["t"], 1, "the change seen")
        assert not any(loop.done() for loop in loops)
    finally:
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await store.close()


def test_background_errors_metric_names_its_loops() -> None:
    metrics = Metrics()
    (family,) = [f for f in metrics.registry.collect() if f.name == "broker_background_errors"]
    assert {s.labels["loop"] for s in family.samples if s.name.endswith("_total")} == set(
        BACKGROUND_LOOPS
    )
    for loop in BACKGROUND_LOOPS:
        assert f"{loop} (" in family.documentation


@pytest.mark.parametrize("fault", ["refuse", "hang", "reset"])
async def test_changes_reach_a_replica_again_after_it_was_cut_off(
    postgres_url: str,
    proxy: PgProxy,
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    fault: str,
) -> None:
    """A broker on the proxy while the database stays up for another replica: while cut off,
    its listener and re-checks fail (counted) and its streams go on; once back, a Disconnect
    made on the other replica ends its stream through the listener, and a change nobody
    announced ends another through the periodic re-check."""
    settings = settings_for(proxy.url_for(postgres_url), local_aws, template_url)
    settings |= {"recheck_interval": 1.0}
    async with start_broker(settings, broker_identity) as running:
        stub = running.stub
        heard, silent = f"heard-{fault}", f"silent-{fault}"
        streams = {}
        for tenant in (heard, silent):
            await connect(running, local_aws, tenant)
            streams[tenant] = stub.WatchCredentials(
                pb.WatchCredentialsRequest(tenant_id=tenant, run_id="run")
            )
            await streams[tenant].read()

        proxy.mode = fault
        cut = time.monotonic()
        while True:
            text = await metrics_text(running)
            if _sample(text, "listener") >= 1 and _sample(text, "recheck") >= 1:
                break
            assert time.monotonic() - cut < 10, text
            await asyncio.sleep(0.2)
        took = time.monotonic() - cut
        print(f"{fault}: listener and re-check failures counted within {took:.1f} s")
        assert len(running.broker.hub) == 2, "the outage ends no stream"

        proxy.mode = "pass"
        back = time.monotonic()
        await wait_until(
            lambda: (running.broker.store.channel_alive() or (0.0, 0.0))[0] > back,
            10,
            "listening again",
        )
        other = await PostgresStore.open(postgres_url)  # the other replica's store
        try:
            current = await other.get(heard)
            assert current is not None
            sent = time.monotonic()
            await other.save(
                replace(current, status=Status.DISCONNECTED, disconnected_at=datetime.now(UTC)),
                new_external_id=False,
            )
            code, took = await _ended(streams[heard], sent, within=3)
            print(f"{fault}: a disconnect on the other replica ended the stream in {took:.2f} s")
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert took < 1.0
        finally:
            await other.close()
        direct = await asyncpg.connect(postgres_url)
        try:  # no notification: only the re-check can tell
            sent = time.monotonic()
            await direct.execute(
                "UPDATE connections SET status = 'DISCONNECTED', version = version + 1 "
                "WHERE tenant_id = $1",
                silent,
            )
        finally:
            await direct.close()
        code, took = await _ended(streams[silent], sent, within=5)
        print(f"{fault}: an unannounced disconnect ended the stream in {took:.2f} s")
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert took < 1.0 + 1.5


def _sample(text: str, loop: str) -> float:
    prefix = f'broker_background_errors_total{{loop="{loop}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    raise AssertionError(f"no {prefix!r} in the metrics")


async def _ended(stream: Any, since: float, within: float) -> tuple[grpc.StatusCode, float]:
    async with asyncio.timeout(within):
        try:
            while True:
                await stream.read()
        except grpc.aio.AioRpcError as ended:
            return ended.code(), time.monotonic() - since
