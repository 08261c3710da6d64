"""The credential cache with a fake source and a fake clock: no sleeping, no AWS. (The two
refresh windows: tests/test_refresh.py; fair eviction: tests/test_fair_cache.py.)"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from broker.cache import CredentialCache
from broker.errors import RoleNotAssumable, TransientAwsError
from broker.models import Credentials, Grant

MARGIN = 1200.0
MANDATORY = 600.0
LIFETIME = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeSource:
    """Mints numbered credentials; can be told to fail or to wait for a gate. Counts the calls
    begun, and those cancelled."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[Grant] = []
        self.cancelled = 0
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None
        self._numbers = itertools.count(1)

    async def get(self, grant: Grant) -> Credentials:
        self.calls.append(grant)
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
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


def make_cache(
    source: FakeSource,
    clock: Clock,
    max_entries: int = 100,
    admit: Callable[[Grant], None] | None = None,
) -> CredentialCache:
    return CredentialCache(
        source,
        refresh_margin=MARGIN,
        refresh_mandatory=MANDATORY,
        max_entries=max_entries,
        admit=admit,
        clock=clock,
    )


async def settled(cache: CredentialCache) -> None:
    """Let the STS calls under way (none held at a gate) finish and be stored."""
    for _ in range(100):
        if not cache.in_flight:
            return
        await asyncio.sleep(0)
    raise AssertionError("an STS call is still under way")


async def test_hit_until_the_mandatory_point_then_waited_for(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock)
    first = await cache.get(grant())
    clock.now += LIFETIME - MARGIN - 1
    assert (await cache.get(grant())).access_key_id == first.access_key_id
    assert len(source.calls) == 1
    clock.now += MARGIN - MANDATORY + 2  # past the mandatory point, no renewal before
    renewed = await cache.get(grant())
    assert renewed.access_key_id != first.access_key_id
    assert len(source.calls) == 2
    assert cache.stats.hits == 1
    assert cache.stats.background_renewals == 0


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
    clock.now += LIFETIME - MANDATORY + 60  # in the mandatory window: the call waits for STS
    source.fail = TransientAwsError("throttled")
    assert (await cache.get(grant())).access_key_id == first.access_key_id
    assert cache.stats.stale_served == 1
    assert len(source.calls) == 2
    # Backing off: the next call does not ask STS again, and is served the same.
    assert (await cache.get(grant())).access_key_id == first.access_key_id
    assert len(source.calls) == 2
    assert cache.stats.stale_served == 2
    clock.now += MANDATORY  # now expired: nothing valid to serve
    with pytest.raises(TransientAwsError):
        await cache.get(grant())


async def test_permanent_refusal_drops_the_whole_tenant(source: FakeSource, clock: Clock) -> None:
    cache = make_cache(source, clock)
    await cache.get(grant("a"))
    await cache.get(grant("b"))
    await cache.get(grant("c", tenant="other"))
    clock.now += LIFETIME - MANDATORY + 1
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
    assert len(source.calls) == 1
    clock.now += 2  # past half-life: renewed in the background, the call answered at once
    assert (await cache.get(grant())).access_key_id == first.access_key_id
    await settled(cache)
    assert (await cache.get(grant())).access_key_id != first.access_key_id
    assert len(source.calls) == 2


async def test_the_only_caller_giving_up_abandons_the_call(
    source: FakeSource, clock: Clock
) -> None:
    """A call that nobody waits for any more (not a background renewal) is cancelled."""
    cache = make_cache(source, clock)
    source.gate = asyncio.Event()
    impatient = asyncio.create_task(cache.get(grant()))
    await asyncio.sleep(0)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    await settled(cache)
    assert source.cancelled == 1
    assert len(cache) == 0


class Refused(Exception):
    """What a test's `admit` raises."""


class Admissions:
    """An `admit` hook that records the grants it was asked about, and can refuse."""

    def __init__(self) -> None:
        self.asked: list[Grant] = []
        self.refuse = False

    def __call__(self, grant: Grant) -> None:
        self.asked.append(grant)
        if self.refuse:
            raise Refused(grant.run_id)


async def test_admit_refusing_a_new_run_reaches_the_caller_and_starts_nothing(
    source: FakeSource, clock: Clock
) -> None:
    admit = Admissions()
    cache = make_cache(source, clock, admit=admit)
    admit.refuse = True
    with pytest.raises(Refused):
        await cache.get(grant("new"))
    assert source.calls == []
    assert cache.in_flight == 0
    assert admit.asked == [grant("new")]
    admit.refuse = False
    await cache.get(grant("new"))
    assert len(source.calls) == 1


async def test_admit_is_asked_once_per_new_run_not_for_joining_or_renewals(
    source: FakeSource, clock: Clock
) -> None:
    admit = Admissions()
    cache = make_cache(source, clock, admit=admit)
    source.gate = asyncio.Event()
    waiters = [asyncio.create_task(cache.get(grant())) for _ in range(5)]
    stream = asyncio.create_task(cache.get(grant(), newer_than="ASIA0000"))
    await asyncio.sleep(0)
    source.gate.set()
    await asyncio.gather(*waiters, stream)
    assert admit.asked == [grant()], "the calls joining the one under way were not asked"

    admit.refuse = True  # from here on, any question would fail the call
    clock.now += LIFETIME - MARGIN + 1  # advisory window: a background renewal
    await cache.get(grant())
    await settled(cache)
    clock.now += LIFETIME - MANDATORY + 1  # past the renewed entry's mandatory point
    await cache.get(grant())
    held = await cache.get(grant())
    await cache.get(grant(), newer_than=held.access_key_id)  # a stream's renewal
    assert len(source.calls) == 4
    assert admit.asked == [grant()]
    cache.release("t", "run")  # the run ended: the same id again is a new run
    with pytest.raises(Refused):
        await cache.get(grant())
    assert len(source.calls) == 4


def test_a_grant_for_another_run_keeps_every_other_field() -> None:
    """Grant.for_run is built field by field (the hot path): a field added to Grant, with a
    default or not, must not be dropped or reset there."""
    grant = Grant(*(f"value-{n}" for n in range(len(Grant._fields))))
    other = grant.for_run("another-run")
    assert other.run_id == "another-run"
    assert other._replace(run_id=grant.run_id) == grant
