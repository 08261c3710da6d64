"""The credential cache with a fake source and a fake clock: no sleeping, no AWS."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta

import pytest

from broker.cache import CredentialCache
from broker.errors import RoleNotAssumable, TransientAwsError
from broker.models import Credentials, Grant

MARGIN = 1200.0
LIFETIME = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeSource:
    """Mints numbered credentials; can be told to fail or to wait for a gate."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[Grant] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None
        self._numbers = itertools.count(1)

    async def get(self, grant: Grant) -> Credentials:
        self.calls.append(grant)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        issued = datetime.fromtimestamp(self.clock.now, UTC)
        return Credentials(
            access_key_id=f"ASIA{next(self._numbers):04d}",
            secret_access_key="secret",
            session_token="token",
            expiration=issued + timedelta(seconds=LIFETIME),
            assumed_role_arn=f"arn:aws:sts::1:assumed-role/r/{grant.run_id}",
            issued_at=issued,
        )


def grant(run: str = "run", tenant: str = "t", role: str = "arn:aws:iam::1:role/r") -> Grant:
    return Grant(tenant, run, role, "external-id", "us-east-1")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def source(clock: Clock) -> FakeSource:
    return FakeSource(clock)


def make_cache(source: FakeSource, clock: Clock, max_entries: int = 100) -> CredentialCache:
    return CredentialCache(source, refresh_margin=MARGIN, max_entries=max_entries, clock=clock)


async def test_hit_until_the_refresh_point_then_renewed(source: FakeSource, clock: Clock) -> None:
    cache = make_cache(source, clock)
    first = await cache.get(grant())
    clock.now += LIFETIME - MARGIN - 1
    assert (await cache.get(grant())).access_key_id == first.access_key_id
    clock.now += 2
    renewed = await cache.get(grant())
    assert renewed.access_key_id != first.access_key_id
    assert len(source.calls) == 2
    assert cache.stats.hits == 1


async def test_concurrent_misses_make_one_call(source: FakeSource, clock: Clock) -> None:
    cache = make_cache(source, clock)
    source.gate = asyncio.Event()
    waiters = [asyncio.create_task(cache.get(grant())) for _ in range(100)]
    await asyncio.sleep(0)
    source.gate.set()
    results = await asyncio.gather(*waiters)
    assert len({c.access_key_id for c in results}) == 1
    assert len(source.calls) == 1


async def test_a_caller_giving_up_does_not_cancel_the_others(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock)
    source.gate = asyncio.Event()
    impatient = asyncio.create_task(cache.get(grant()))
    patient = asyncio.create_task(cache.get(grant()))
    await asyncio.sleep(0)
    impatient.cancel()
    source.gate.set()
    assert (await patient).access_key_id == "ASIA0001"
    assert len(source.calls) == 1


async def test_stale_credentials_served_while_sts_fails_transiently(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock)
    first = await cache.get(grant())
    clock.now += LIFETIME - MARGIN + 60
    source.fail = TransientAwsError("throttled")
    assert (await cache.get(grant())).access_key_id == first.access_key_id
    assert cache.stats.stale_served == 1
    clock.now += MARGIN  # now expired: nothing valid to serve
    with pytest.raises(TransientAwsError):
        await cache.get(grant())


async def test_permanent_refusal_drops_the_whole_tenant(source: FakeSource, clock: Clock) -> None:
    cache = make_cache(source, clock)
    await cache.get(grant("a"))
    await cache.get(grant("b"))
    await cache.get(grant("c", tenant="other"))
    clock.now += LIFETIME - MARGIN + 1
    source.fail = RoleNotAssumable("AccessDenied", code="AccessDenied")
    with pytest.raises(RoleNotAssumable):
        await cache.get(grant("a"))
    assert len(cache) == 1, "only the other tenant's run is left"


async def test_another_role_or_external_id_is_never_served_the_old_credentials(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock)
    old = await cache.get(grant())
    assert (
        await cache.get(grant(role="arn:aws:iam::1:role/new"))
    ).access_key_id != old.access_key_id
    changed_id = Grant("t", "run", "arn:aws:iam::1:role/r", "another-external-id", "us-east-1")
    assert (await cache.get(changed_id)).access_key_id != old.access_key_id


async def test_evicted_while_fetching_is_not_stored(source: FakeSource, clock: Clock) -> None:
    cache = make_cache(source, clock)
    source.gate = asyncio.Event()
    pending = asyncio.create_task(cache.get(grant()))
    await asyncio.sleep(0)
    cache.evict_tenant("t")  # a Disconnect lands while STS is answering
    source.gate.set()
    await pending
    assert len(cache) == 0


async def test_bounded_least_recently_used_first(source: FakeSource, clock: Clock) -> None:
    cache = make_cache(source, clock, max_entries=3)
    for run in "abc":
        await cache.get(grant(run))
    await cache.get(grant("a"))  # a is now the most recently used
    await cache.get(grant("d"))
    assert len(cache) == 3
    assert cache.stats.evictions == 1
    calls = len(source.calls)
    await cache.get(grant("a"))
    assert len(source.calls) == calls, "a stayed"
    await cache.get(grant("b"))
    assert len(source.calls) == calls + 1, "b was evicted"


async def test_sweep_drops_expired_and_release_forgets_a_run(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock)
    await cache.get(grant("a"))
    clock.now += LIFETIME / 2
    await cache.get(grant("b"))
    clock.now += LIFETIME / 2 + 1
    assert cache.sweep() == 1
    cache.release("t", "b")
    assert len(cache) == 0


async def test_newer_than_renews_once_for_many_streams(source: FakeSource, clock: Clock) -> None:
    cache = make_cache(source, clock)
    held = await cache.get(grant())
    first = await cache.get(grant(), newer_than=held.access_key_id)
    second = await cache.get(grant(), newer_than=held.access_key_id)
    assert first.access_key_id == second.access_key_id != held.access_key_id
    assert len(source.calls) == 2


async def test_short_lifetimes_are_renewed_half_way_not_every_call(
    source: FakeSource, clock: Clock
) -> None:
    cache = CredentialCache(source, refresh_margin=MARGIN * 10, max_entries=10, clock=clock)
    first = await cache.get(grant())
    clock.now += LIFETIME / 2 - 1
    assert (await cache.get(grant())).access_key_id == first.access_key_id
    clock.now += 2
    assert (await cache.get(grant())).access_key_id != first.access_key_id
