"""Fair eviction: when the cache is full, the least recently used run of the tenant holding the
most goes, so a tenant within its share (max entries / tenants present) keeps its runs however
much another churns. Unit tests with a fake source, then the issue's scenario through gRPC."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from broker.cache import CredentialCache
from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from tests.conftest import StsLog, connect, settings_for, start_broker
from tests.test_cache import Clock, FakeSource, grant, make_cache


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def source(clock: Clock) -> FakeSource:
    return FakeSource(clock)


def held(cache: CredentialCache) -> dict[str, int]:
    """Runs cached per tenant."""
    return {tenant: len(cache.grants_of(tenant)) for tenant in cache.tenants()}


async def fill(cache: CredentialCache, tenant: str, runs: range) -> None:
    for run in runs:
        await cache.get(grant(f"{tenant}-{run}", tenant=tenant))


async def calls_for(cache: CredentialCache, source: FakeSource, tenant: str, runs: range) -> int:
    """How many of the tenant's runs had to go to STS again."""
    before = len(source.calls)
    await fill(cache, tenant, runs)
    return len(source.calls) - before


async def test_two_noisy_tenants_do_not_evict_a_quiet_one(source: FakeSource, clock: Clock) -> None:
    cache = make_cache(source, clock, max_entries=30)
    await fill(cache, "quiet", range(5))  # a share is 10 once three tenants are present
    for run in range(100):
        await fill(cache, "noisy-a", range(run, run + 1))
        await fill(cache, "noisy-b", range(run, run + 1))
    assert len(cache) == 30
    counts = held(cache)
    assert counts["quiet"] == 5
    assert abs(counts["noisy-a"] - counts["noisy-b"]) <= 1
    assert await calls_for(cache, source, "quiet", range(5)) == 0
    assert cache.stats.evictions == 200 + 5 - 30


async def test_a_tenant_exactly_at_its_share_keeps_every_run(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock, max_entries=20)
    await fill(cache, "globex", range(10))
    await fill(cache, "acme", range(60))
    assert held(cache) == {"globex": 10, "acme": 10}
    assert await calls_for(cache, source, "globex", range(10)) == 0
    assert await calls_for(cache, source, "acme", range(50, 60)) == 0, "acme's latest stayed"


async def test_a_tenant_over_its_share_is_trimmed_to_it_and_no_further(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock, max_entries=20)
    await fill(cache, "early", range(15))  # alone, it may hold the whole cache
    await fill(cache, "acme", range(100))
    assert held(cache) == {"early": 10, "acme": 10}
    assert await calls_for(cache, source, "early", range(5, 15)) == 0, "its latest 10 stayed"


async def test_a_single_tenant_may_use_the_whole_cache_least_recently_used_first(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock, max_entries=10)
    await fill(cache, "solo", range(10))
    assert cache.stats.evictions == 0
    await cache.get(grant("solo-0", tenant="solo"))  # now its most recently used
    await fill(cache, "solo", range(10, 11))
    assert len(cache) == 10
    assert cache.stats.evictions == 1
    assert await calls_for(cache, source, "solo", range(0, 1)) == 0
    assert await calls_for(cache, source, "solo", range(1, 2)) == 1, "run 1 was the LRU"


async def test_ties_evict_from_the_tenant_that_came_to_hold_that_many_first(
    source: FakeSource, clock: Clock
) -> None:
    cache = make_cache(source, clock, max_entries=6)
    await fill(cache, "a", range(2))
    await fill(cache, "b", range(2))
    await fill(cache, "c", range(2))
    await fill(cache, "d", range(1))  # full: a, b and c hold 2 each; a got there first
    assert held(cache) == {"a": 1, "b": 2, "c": 2, "d": 1}
    await fill(cache, "e", range(1))  # then b
    assert held(cache) == {"a": 1, "b": 1, "c": 2, "d": 1, "e": 1}


async def test_release_eviction_and_sweep_keep_the_counts(source: FakeSource, clock: Clock) -> None:
    cache = make_cache(source, clock, max_entries=10)
    await fill(cache, "a", range(6))
    await fill(cache, "b", range(4))
    cache.release("a", "a-0")
    cache.release("a", "a-0")  # again: nothing
    cache.evict_tenant("b")
    assert held(cache) == {"a": 5}
    await fill(cache, "c", range(8))  # from its sixth run on, c evicts its own
    assert len(cache) == 10
    assert held(cache) == {"a": 5, "c": 5}
    clock.now += 3600
    assert cache.sweep() == 10
    assert len(cache) == 0
    assert cache.tenants() == []
    await fill(cache, "d", range(12))
    assert held(cache) == {"d": 10}


class Model:
    """Fair eviction the slow, obvious way: a scan of every tenant for the one holding the most
    (ties: the one whose count changed least recently), then its least recently used run."""

    def __init__(self, max_entries: int) -> None:
        self.max = max_entries
        self.runs: dict[str, list[str]] = {}  # tenant → runs, least recently used first
        self.changed: dict[str, int] = {}  # tenant → when its count last changed
        self.clock = 0

    def _count_changed(self, tenant: str) -> None:
        self.clock += 1
        self.changed[tenant] = self.clock

    def get(self, tenant: str, run: str) -> None:
        runs = self.runs.setdefault(tenant, [])
        if run in runs:
            runs.remove(run)
            runs.append(run)
            return
        runs.append(run)
        self._count_changed(tenant)
        if sum(len(r) for r in self.runs.values()) > self.max:
            most = max(len(r) for r in self.runs.values())
            victim = min(
                (t for t, r in self.runs.items() if len(r) == most), key=self.changed.__getitem__
            )
            self.release(victim, self.runs[victim][0])

    def release(self, tenant: str, run: str) -> None:
        runs = self.runs.get(tenant, [])
        if run in runs:
            runs.remove(run)
            self._count_changed(tenant)
            if not runs:
                del self.runs[tenant]

    def evict_tenant(self, tenant: str) -> None:
        for run in list(self.runs.get(tenant, ())):
            self.release(tenant, run)

    def keys(self) -> set[tuple[str, str]]:
        return {(t, r) for t, runs in self.runs.items() for r in runs}


async def test_the_cache_evicts_as_the_obvious_model_does(source: FakeSource, clock: Clock) -> None:
    """Random gets (new runs and repeats), releases and tenant evictions, by tenants of very
    different appetites: the cache holds exactly what a full scan would have kept."""
    rng = random.Random(15)
    cache, model = make_cache(source, clock, max_entries=40), Model(40)
    appetite = {f"t{i}": 2**i for i in range(7)}  # runs each tenant picks from
    for _ in range(3000):
        tenant = rng.choice(list(appetite))
        run = f"{tenant}-{rng.randrange(appetite[tenant])}"
        action = rng.random()
        if action < 0.9:
            await cache.get(grant(run, tenant=tenant))
            model.get(tenant, run)
        elif action < 0.99:
            cache.release(tenant, run)
            model.release(tenant, run)
        else:
            cache.evict_tenant(tenant)
            model.evict_tenant(tenant)
        assert {g.key for t in cache.tenants() for g in cache.grants_of(t)} == model.keys()
        assert len(cache) == len(model.keys()) <= 40
    assert cache.stats.evictions > 500


# Through gRPC: the issue's scenario.


async def test_new_runs_of_one_tenant_do_not_evict_another_tenants_run(
    local_aws: LocalAws,
    template_url: str,
    tmp_path: Path,
    broker_identity: Identity,
    sts_log: StsLog,
    tenant: str,
) -> None:
    """BROKER_CACHE_MAX_ENTRIES=50, and 60 new runs of acme: globex's cached run stays (one
    global LRU evicted it)."""
    settings: dict[str, Any] = settings_for(
        f"sqlite:///{tmp_path / 'broker.db'}", local_aws, template_url
    ) | {
        "cache_max_entries": 50,
        # This test is about the cache, not about the new-session rate.
        "tenant_sts_rate": 1000.0,
        "tenant_sts_burst": 1000,
    }
    acme, globex = f"acme-{tenant}", f"globex-{tenant}"
    async with start_broker(settings, broker_identity) as running:
        cache = running.broker.cache

        async def issue(tenant_id: str, run_id: str) -> str:
            answer = await running.stub.IssueCredentials(
                pb.IssueCredentialsRequest(tenant_id=tenant_id, run_id=run_id)
            )
            return answer.credentials.access_key_id

        acme_role = (await connect(running, local_aws, acme)).role_arn
        globex_role = (await connect(running, local_aws, globex)).role_arn

        def calls(role_arn: str) -> int:
            return sum(1 for call in sts_log.now() if call.role_arn == role_arn and call.allowed)

        cached = await issue(globex, "nightly")
        globex_calls, acme_calls = calls(globex_role), calls(acme_role)
        for run in range(60):
            await issue(acme, f"r{run}")
        assert calls(acme_role) == acme_calls + 60
        assert len(cache) == 50
        assert await issue(globex, "nightly") == cached
        assert calls(globex_role) == globex_calls, "globex's run was still cached"
        assert len(cache.grants_of(acme)) == 49
        await issue(acme, "r59")
        await issue(acme, "r11")
        assert calls(acme_role) == acme_calls + 60, "acme's 49 latest runs stayed"
        await issue(acme, "r10")
        assert calls(acme_role) == acme_calls + 61, "acme's own churn evicted its older runs"
