"""The cache's two refresh windows (botocore's advisory and mandatory, server-side): unit tests
with a fake clock and source, then through gRPC against the emulator, with STS slow or down."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker import cache as cache_module
from broker import server
from broker.cache import CredentialCache, refresh_point, refresh_points
from broker.credentials import ConfirmedSource
from broker.emulator import Identity, LocalAws
from broker.errors import GrantChanged, RoleNotAssumable, TransientAwsError
from broker.models import Credentials, Grant
from broker.v1 import broker_pb2 as pb
from tests.conftest import StsLog, connect, metrics_text, settings_for, start_broker
from tests.faults import FaultyAws
from tests.test_cache import (
    LIFETIME,
    MANDATORY,
    MARGIN,
    Clock,
    FakeSource,
    grant,
    make_cache,
    settled,
)

ADVISORY = LIFETIME - MARGIN + 60  # seconds after issue: inside the advisory window
PAST_MANDATORY = LIFETIME - MANDATORY + 60  # inside the mandatory window


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def source(clock: Clock) -> FakeSource:
    return FakeSource(clock)


def credentials(lifetime: float) -> Credentials:
    issued = datetime(2027, 1, 1, tzinfo=UTC)
    return Credentials(
        access_key_id="ASIA",
        secret_access_key="secret",
        session_token="token",
        expiration=issued + timedelta(seconds=lifetime),
        assumed_role_arn="arn:aws:sts::1:assumed-role/r/run",
        issued_at=issued,
    )


async def at_once(cache: CredentialCache) -> Credentials:
    """A call the cache answers without waiting for STS (held at a gate). Bounded, so that a
    cache making it wait fails the test instead of hanging it."""
    return await asyncio.wait_for(cache.get(grant()), 5)


@pytest.mark.parametrize(
    ("lifetime", "margin", "mandatory", "leads"),
    [
        (3600, 1200, 600, (1200, 600)),  # the defaults
        (3600, 1200, None, (1200, 600)),  # unset: half the advisory lead
        (3600, 1200, 900, (1200, 600)),  # more than half the advisory lead: scaled to it
        (3600, 60, 30, (60, 30)),
        (900, 450, 225, (450, 225)),  # the shortest session, its defaults
        (900, 1200, 600, (450, 225)),  # a margin too long for the lifetime: half-life
        (60, 1200, 600, (30, 15)),
    ],
)
def test_two_refresh_points_scale_with_the_lifetime(
    lifetime: float, margin: float, mandatory: float | None, leads: tuple[float, float]
) -> None:
    held = credentials(lifetime)
    expiry = held.expiration.timestamp()
    advisory, due = refresh_points(held, margin, float("inf") if mandatory is None else mandatory)
    assert (expiry - advisory, expiry - due) == leads
    assert advisory == refresh_point(held, margin), "streams renew before the same point"
    assert advisory < due < expiry


async def test_in_the_advisory_window_every_call_is_answered_at_once_and_one_renewal_runs(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock)
    first = await cache.get(grant())
    clock.now += ADVISORY
    source.gate = asyncio.Event()  # STS does not answer until told
    answers = await asyncio.gather(*(at_once(cache) for _ in range(50)))
    assert {c.access_key_id for c in answers} == {first.access_key_id}
    assert len(source.calls) == 2, "one renewal, started by the first call"
    assert cache.in_flight == 1
    assert cache.stats.background_renewals == 1
    assert cache.stats.hits == 50
    source.gate.set()
    await settled(cache)
    renewed = await cache.get(grant())
    assert renewed.access_key_id != first.access_key_id
    assert len(source.calls) == 2
    assert cache.stats.background_failures == 0


async def test_close_cancels_a_background_renewal_still_under_way(
    source: FakeSource, clock: Clock
) -> None:
    """At shutdown the cache's STS calls end before the AWS client closes under them."""
    cache = make_cache(source, clock)
    await cache.get(grant())
    clock.now += ADVISORY
    source.gate = asyncio.Event()  # never answers
    await at_once(cache)
    assert cache.in_flight == 1
    await asyncio.wait_for(cache.close(), 5)
    assert cache.in_flight == 0


async def test_past_the_mandatory_point_a_call_waits_for_the_renewal(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock)
    first = await cache.get(grant())
    clock.now += PAST_MANDATORY
    source.gate = asyncio.Event()
    waiting = asyncio.create_task(cache.get(grant()))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not waiting.done()
    source.gate.set()
    assert (await waiting).access_key_id != first.access_key_id
    assert cache.stats.background_renewals == 0


async def test_past_the_mandatory_point_a_call_waits_for_a_hung_sts_only_so_long(
    source: FakeSource, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STS hangs (botocore would retry for 15 s): a call holding valid credentials is served
    them after MANDATORY_WAIT, the renewal runs on, the next calls are answered at once with
    no second STS call, and the renewal's answer, when it comes, is what they get next."""
    monkeypatch.setattr(cache_module, "MANDATORY_WAIT", 0.2, raising=False)
    cache = make_cache(source, clock)
    first = await cache.get(grant())
    clock.now += PAST_MANDATORY
    source.gate = asyncio.Event()
    started = time.monotonic()
    served = await asyncio.wait_for(cache.get(grant()), 5)
    assert served.access_key_id == first.access_key_id
    assert time.monotonic() - started >= 0.2
    assert cache.stats.stale_served == 1
    assert cache.in_flight == 1, "the renewal runs on"
    again = await at_once(cache)
    assert again.access_key_id == first.access_key_id
    assert len(source.calls) == 2, "no second STS call while the first is under way"
    source.gate.set()
    await settled(cache)
    assert (await at_once(cache)).access_key_id != first.access_key_id
    assert source.cancelled == 0


async def test_a_call_past_the_mandatory_point_joins_the_background_renewal(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock)
    first = await cache.get(grant())
    clock.now += ADVISORY
    source.gate = asyncio.Event()
    assert (await at_once(cache)).access_key_id == first.access_key_id
    clock.now += PAST_MANDATORY - ADVISORY  # STS still has not answered
    waiting = asyncio.create_task(cache.get(grant()))
    await asyncio.sleep(0)
    assert len(source.calls) == 2, "no second call: it waits for the one under way"
    source.gate.set()
    assert (await waiting).access_key_id != first.access_key_id


async def test_a_background_renewal_is_not_cancelled_when_its_waiters_give_up(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock)
    first = await cache.get(grant())
    clock.now += ADVISORY
    source.gate = asyncio.Event()
    await at_once(cache)  # starts the renewal
    clock.now += PAST_MANDATORY - ADVISORY
    impatient = asyncio.create_task(cache.get(grant()))
    await asyncio.sleep(0)
    impatient.cancel()  # the last (only) waiter leaves, as at a deadline
    with pytest.raises(asyncio.CancelledError):
        await impatient
    await asyncio.sleep(0)
    assert source.cancelled == 0
    assert cache.in_flight == 1
    source.gate.set()
    await settled(cache)
    assert (await cache.get(grant())).access_key_id != first.access_key_id
    assert len(source.calls) == 2


async def test_a_call_a_background_renewal_relies_on_is_not_cancelled_either(
    source: FakeSource, clock: Clock
) -> None:
    """A stream asked for newer credentials (a call of its own); then a call in the advisory
    window found that call under way and rode on it: the stream leaving does not cancel it."""
    cache = make_cache(source, clock)
    first = await cache.get(grant())
    clock.now += ADVISORY
    source.gate = asyncio.Event()
    stream = asyncio.create_task(cache.get(grant(), newer_than=first.access_key_id))
    await asyncio.sleep(0)
    assert (await at_once(cache)).access_key_id == first.access_key_id
    stream.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stream
    assert source.cancelled == 0
    source.gate.set()
    await settled(cache)
    assert (await cache.get(grant())).access_key_id != first.access_key_id
    assert len(source.calls) == 2


async def test_evicted_during_a_background_renewal_nothing_is_stored(
    source: FakeSource, clock: Clock
) -> None:
    """A Disconnect lands while the renewal runs: its result is dropped, and a renewal nobody
    waits for is cancelled rather than left to run for a tenant that is gone."""
    cache = make_cache(source, clock)
    await cache.get(grant())
    clock.now += ADVISORY
    source.gate = asyncio.Event()
    await at_once(cache)
    await asyncio.sleep(0)  # the renewal is under way (held at the gate)
    cache.evict_tenant("t")
    assert cache.in_flight == 0
    await asyncio.sleep(0)  # the cancellation reaches the call
    assert source.cancelled == 1
    assert len(cache) == 0
    source.gate = None
    await cache.get(grant())
    assert len(source.calls) == 3, "a new call, not the old one's result"


async def test_evicted_during_a_background_renewal_a_waiter_is_answered_nothing_stored(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock)
    first = await cache.get(grant())
    clock.now += ADVISORY
    source.gate = asyncio.Event()
    await at_once(cache)
    clock.now += PAST_MANDATORY - ADVISORY
    waiter = asyncio.create_task(cache.get(grant()))
    await asyncio.sleep(0)
    cache.evict_tenant("t")
    late = asyncio.create_task(cache.get(grant()))  # after the eviction: does not join
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(source.calls) == 3
    source.gate.set()
    assert (await waiter).access_key_id != first.access_key_id
    await late
    await settled(cache)
    assert len(cache) == 1
    assert (await cache.get(grant())).access_key_id == (await late).access_key_id, (
        "the call made after the eviction is stored; the one from before is not"
    )
    assert source.cancelled == 0


async def test_a_background_renewal_failing_transiently_backs_off_and_the_cache_serves(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock)
    first = await cache.get(grant())
    clock.now += ADVISORY
    source.fail = TransientAwsError("throttled")
    for _ in range(5):
        assert (await cache.get(grant())).access_key_id == first.access_key_id
        await settled(cache)
    assert len(source.calls) == 2, "backing off: one attempt, not one per call"
    assert cache.stats.background_renewals == 1
    assert cache.stats.background_failures == 1
    clock.now += 2  # past the first pause (at most a second)
    assert (await cache.get(grant())).access_key_id == first.access_key_id
    await settled(cache)
    assert len(source.calls) == 3
    assert cache.stats.background_failures == 2
    source.fail = None
    clock.now += 4  # past the second pause (at most two seconds)
    await cache.get(grant())
    await settled(cache)
    assert (await cache.get(grant())).access_key_id != first.access_key_id


async def test_a_background_renewal_refused_evicts_the_tenant(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock)
    first = await cache.get(grant("a"))
    await cache.get(grant("b"))
    await cache.get(grant("c", tenant="other"))
    clock.now += ADVISORY
    source.fail = RoleNotAssumable("AccessDenied", code="AccessDenied")
    assert (await cache.get(grant("a"))).access_key_id == first.access_key_id
    await settled(cache)
    assert cache.tenants() == ["other"]
    assert cache.stats.background_failures == 1
    with pytest.raises(RoleNotAssumable):
        await cache.get(grant("a"))


async def test_a_background_renewal_never_brings_back_a_released_run(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock)
    await cache.get(grant())
    clock.now += ADVISORY
    source.gate = asyncio.Event()
    await at_once(cache)
    cache.release("t", "run")
    source.gate.set()
    await settled(cache)
    assert len(cache) == 0


async def test_streams_still_get_credentials_before_their_advisory_point(
    source: FakeSource, clock: Clock
) -> None:
    """A stream asks for credentials other than those it holds; past the advisory point it
    waits for new ones, as before (and streams keep their own jittered schedule)."""
    cache = make_cache(source, clock)
    first = await cache.get(grant())
    clock.now += ADVISORY
    fresh = await cache.get(grant(), newer_than="ASIA-another-key")
    assert fresh.access_key_id != first.access_key_id
    assert cache.stats.background_renewals == 0


class Keeper:
    """A GrantKeeper whose confirmation after AssumeRole fails, when told to: the grant changed
    meanwhile."""

    def __init__(self) -> None:
        self.confirmed = 0
        self.changed = False

    def generation(self, tenant_id: str) -> int:
        return 0

    async def ensure_fresh(self, grant: Grant) -> None:
        pass

    async def confirm(self, grant: Grant, generation: int) -> None:
        self.confirmed += 1
        if self.changed:
            raise GrantChanged("changed")


async def test_a_background_renewal_goes_through_the_store_confirmation(
    source: FakeSource, clock: Clock
) -> None:
    keeper = Keeper()
    cache = CredentialCache(
        ConfirmedSource(source, keeper),
        refresh_margin=MARGIN,
        refresh_mandatory=MANDATORY,
        max_entries=10,
        clock=clock,
    )
    first = await cache.get(grant())
    keeper.changed = True
    clock.now += ADVISORY
    assert (await cache.get(grant())).access_key_id == first.access_key_id
    await settled(cache)
    assert keeper.confirmed == 2
    assert cache.stats.background_failures == 1
    assert (await cache.get(grant())).access_key_id == first.access_key_id, "not stored"
    assert len(source.calls) == 2, "and backing off"


# Through gRPC: a real broker against the emulator. The cache's clock runs ahead of real time
# by `offset` (the credentials, STS and the store keep real time), so a test reaches a refresh
# window of real one-hour credentials at once.


class Ahead:
    def __init__(self) -> None:
        self.offset = 0.0
        self.frozen: float | None = None  # set: the clock stands still there

    def __call__(self) -> float:
        return time.time() + self.offset if self.frozen is None else self.frozen


@pytest.fixture
def cache_clock(monkeypatch: pytest.MonkeyPatch) -> Ahead:
    clock = Ahead()
    monkeypatch.setattr(server, "CredentialCache", functools.partial(CredentialCache, clock=clock))
    return clock


@pytest.fixture(scope="module")
def faults(local_aws: LocalAws) -> Iterator[FaultyAws]:
    proxy = FaultyAws(local_aws.endpoint_url).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def settings(local_aws: LocalAws, template_url: str, tmp_path: Path) -> dict[str, Any]:
    return settings_for(f"sqlite:///{tmp_path / 'broker.db'}", local_aws, template_url)


def issue(tenant: str, run: str = "run") -> pb.IssueCredentialsRequest:
    return pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run)


async def until(condition: Any, seconds: float = 30.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.05)


async def test_past_the_advisory_point_calls_are_answered_from_the_cache_while_sts_renews(
    settings: dict[str, Any],
    broker_identity: Identity,
    local_aws: LocalAws,
    tenant: str,
    sts_log: StsLog,
    cache_clock: Ahead,
) -> None:
    async with start_broker(settings, broker_identity) as running:
        cache = running.broker.cache
        await connect(running, local_aws, tenant)
        first = (await running.stub.IssueCredentials(issue(tenant))).credentials
        made = len(sts_log.now())
        # STS holds every AssumeRole answer back 3 s (under the broker's read timeout).
        local_aws.sts.latency = 3.0
        cache_clock.offset = ADVISORY
        answers = await asyncio.gather(
            *(running.stub.IssueCredentials(issue(tenant)) for _ in range(20))
        )
        assert {a.credentials.access_key_id for a in answers} == {first.access_key_id}
        assert len(sts_log.now()) == made, "all answered before STS answered the renewal"
        assert cache.in_flight == 1
        await until(lambda: cache.in_flight == 0)
        assert len(sts_log.now()) == made + 1, "exactly one AssumeRole for the 20 calls"
        local_aws.sts.latency = 0.0
        # The renewed credentials were issued just now (real time): back to it, they are fresh.
        cache_clock.offset = 0.0
        after = (await running.stub.IssueCredentials(issue(tenant))).credentials
        assert after.access_key_id != first.access_key_id
        assert len(sts_log.now()) == made + 1
        assert cache.stats.background_renewals == 1


async def test_during_an_sts_outage_calls_with_valid_credentials_do_not_wait_on_it(
    settings: dict[str, Any],
    broker_identity: Identity,
    local_aws: LocalAws,
    tenant: str,
    faults: FaultyAws,
    cache_clock: Ahead,
) -> None:
    """In the advisory window a call never waits on a hung STS; in the mandatory window it
    waits for one attempt (botocore's tries of it), then is served the still-valid
    credentials, and the next call is not held by STS at all (backing off)."""
    faults.clear()
    async with start_broker(
        settings | {"aws_endpoint_url": faults.endpoint_url}, broker_identity
    ) as running:
        cache = running.broker.cache
        await connect(running, local_aws, tenant)
        first = (await running.stub.IssueCredentials(issue(tenant))).credentials
        try:
            faults.inject("hang", seconds=1.5)  # each try held, then reset: ≥ 4.5 s in all
            cache_clock.offset = ADVISORY
            answers = await asyncio.gather(
                *(running.stub.IssueCredentials(issue(tenant)) for _ in range(10))
            )
            assert {a.credentials.access_key_id for a in answers} == {first.access_key_id}
            assert cache.in_flight == 1, "answered while the renewal still hung"
            assert cache.stats.background_failures == 0
            await until(lambda: cache.in_flight == 0)
            assert cache.stats.background_failures == 1

            faults.inject("down")  # every request reset at once
            # Inside the mandatory window, where the cache's clock stands still: the pause
            # before the next renewal does not run out in this test, however slow it runs.
            cache_clock.frozen = time.time() + PAST_MANDATORY
            tries = faults.requests["AssumeRole"]
            stale = (await running.stub.IssueCredentials(issue(tenant))).credentials
            assert stale.access_key_id == first.access_key_id
            assert 1 <= faults.requests["AssumeRole"] - tries <= 3, "one attempt"
            assert cache.stats.stale_served == 1
            tries = faults.requests["AssumeRole"]
            again = (await running.stub.IssueCredentials(issue(tenant))).credentials
            assert again.access_key_id == first.access_key_id
            assert faults.requests["AssumeRole"] == tries, "backing off: STS not asked again"
            text = await metrics_text(running)
        finally:
            faults.clear()
    assert "broker_cache_background_renewals_total 1.0" in text
    assert "broker_cache_background_failures_total 1.0" in text
