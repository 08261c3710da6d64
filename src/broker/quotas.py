"""Fair share: what one tenant or one caller may take of this replica, so a noisy one (a
launcher looping on new run ids, a UI creating tenants, a script holding streams open) cannot
starve the others. Over a limit, a call gets RESOURCE_EXHAUSTED naming the limit
(`ResourceExhausted`: QuotaFailure, ErrorInfo, and RetryInfo where waiting helps).

- tenant_sts_rate: new STS sessions (a run's first credentials) per tenant, a token bucket;
  checked by the cache's `admit`, on a miss for a run it holds nothing for.
- tenant_sts_concurrency: a tenant's AssumeRole calls in flight (more wait their turn);
  `TenantShare`, around the STS call.
- tenant_streams, caller_streams: open WatchCredentials streams; `Limits.stream`.
- tenant_verify: VerifyRole calls in flight per tenant; `Limits.verifying`.
- caller_tenant_rate: tenants created per caller, a token bucket; `Limits.new_tenant`.

Cached answers never reach a limit: every check sits behind a cache miss or on a call that
is not IssueCredentials. Limits are per replica (state in memory): N replicas admit up to N
times a rate. Metrics count hits by limit (`broker_limit_hits`), never by tenant or caller: a
label per tenant would grow without bound; the RPC's log line names the tenant and the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import CollectorRegistry, Counter

from broker import config
from broker.auth import CallerLimits, Policy
from broker.credentials import CredentialSource
from broker.errors import ResourceExhausted
from broker.metrics import by_label
from broker.models import Credentials, Grant

Limit = Literal[
    "tenant_sts_rate",
    "tenant_sts_concurrency",
    "tenant_streams",
    "caller_streams",
    "tenant_verify",
    "caller_tenant_rate",
]
LIMITS: dict[Limit, str] = {
    "tenant_sts_rate": "a tenant's new STS sessions per second, BROKER_TENANT_STS_RATE",
    "tenant_sts_concurrency": "a tenant's AssumeRole calls in flight, "
    "BROKER_TENANT_STS_CONCURRENCY",
    "tenant_streams": "a tenant's open streams, BROKER_TENANT_MAX_STREAMS",
    "caller_streams": "a caller's open streams, BROKER_CALLER_MAX_STREAMS",
    "tenant_verify": "a tenant's VerifyRole calls in flight, BROKER_TENANT_VERIFY_CONCURRENCY",
    "caller_tenant_rate": "tenants a caller creates per second, BROKER_CALLER_TENANT_RATE",
}
# Buckets kept before full ones (as good as none) are dropped: a bound on memory whatever
# number of tenants or callers comes by.
MAX_IDLE_BUCKETS = 10_000
VERIFY_RETRY_AFTER = 1.0  # seconds: a VerifyRole in flight for the tenant may end by then


@dataclass(frozen=True)
class Settings:
    """The limits' settings (config.Settings' tenant_* and caller_* fields)."""

    tenant_sts_rate: float
    tenant_sts_burst: int
    tenant_sts_concurrency: int
    tenant_max_streams: int
    caller_max_streams: int
    tenant_verify_concurrency: int
    caller_tenant_rate: float
    caller_tenant_burst: int
    callers: Mapping[str, CallerLimits] = field(default_factory=dict)


def limit_settings(settings: config.Settings, policy: Policy | None) -> Settings:
    """The limits configured: BROKER_* settings, and the policy's own limits per caller."""
    return Settings(
        tenant_sts_rate=settings.tenant_sts_rate,
        tenant_sts_burst=settings.tenant_sts_burst,
        tenant_sts_concurrency=settings.tenant_sts_concurrency,
        tenant_max_streams=settings.tenant_max_streams,
        caller_max_streams=settings.caller_max_streams,
        tenant_verify_concurrency=settings.tenant_verify_concurrency,
        caller_tenant_rate=settings.caller_tenant_rate,
        caller_tenant_burst=settings.caller_tenant_burst,
        callers={} if policy is None else dict(policy.limits),
    )


class TokenBucket:
    """`rate` tokens a second, at most `burst` held; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), now

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there is."""
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Buckets:
    """A token bucket per key, made on first use and dropped once full again."""

    def __init__(self, rate: Callable[[str], tuple[float, int]], clock: Callable[[], float]):
        self._rate = rate
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_IDLE_BUCKETS:
                self._drop_full(now)
            bucket = TokenBucket(*self._rate(key), now)
            self._buckets[key] = bucket
        return bucket.take(now)

    def _drop_full(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.burst:
                del self._buckets[key]


class Limits:
    """Every limit of this replica, and the counter of how often each was reached."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.hits = Counter(
            "broker_limit_hits",
            "Calls that reached a fair-share limit: refused with RESOURCE_EXHAUSTED, but for "
            f"tenant_sts_concurrency, where the call waited; {by_label('limit', LIMITS.items())}.",
            ["limit"],
            registry=registry,
        )
        for limit in LIMITS:
            self.hits.labels(limit)
        self._sessions = Buckets(
            lambda _: (settings.tenant_sts_rate, settings.tenant_sts_burst), clock
        )
        self._tenants_created = Buckets(self._caller_tenant_rate, clock)
        self._streams_by_tenant: dict[str, int] = {}
        self._streams_by_caller: dict[str, int] = {}
        self._verifying: dict[str, int] = {}
        self._sts_slots: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    def _caller_tenant_rate(self, caller: str) -> tuple[float, int]:
        own = self.settings.callers.get(caller, CallerLimits())
        return (
            own.tenant_rate or self.settings.caller_tenant_rate,
            own.tenant_burst or self.settings.caller_tenant_burst,
        )

    def _refuse(
        self, limit: Limit, message: str, subject: str, retry_after: float | None
    ) -> ResourceExhausted:
        self.hits.labels(limit).inc()
        return ResourceExhausted(
            message,
            limit=SETTING_OF[limit],
            subject=subject,
            reason=limit.upper(),
            retry_after=retry_after,
        )

    def new_session(self, grant: Grant) -> None:
        """Admit a new STS session for the grant's tenant (the cache's `admit`), or raise."""
        wait = self._sessions.take(grant.tenant_id)
        if wait:
            rate, burst = self.settings.tenant_sts_rate, self.settings.tenant_sts_burst
            raise self._refuse(
                "tenant_sts_rate",
                f"tenant {grant.tenant_id!r} is starting new runs faster than its share of STS "
                f"({rate:g} new sessions a second, {burst} at once); retry in {wait:.1f} s "
                "(runs already issued are served from the cache meanwhile)",
                f"tenant:{grant.tenant_id}",
                wait,
            )

    def new_tenant(self, caller: str) -> None:
        """Admit the creation of a tenant by `caller`, or raise."""
        wait = self._tenants_created.take(caller)
        if wait:
            rate, burst = self._caller_tenant_rate(caller)
            raise self._refuse(
                "caller_tenant_rate",
                f"{caller} is creating tenants faster than its share ({rate:g} a second, "
                f"{burst} at once); retry in {wait:.1f} s",
                f"caller:{caller}",
                wait,
            )

    @contextlib.contextmanager
    def stream(self, caller: str, tenant_id: str) -> Iterator[None]:
        """Hold one of the caller's and one of the tenant's open streams while inside."""
        own = self.settings.callers.get(caller, CallerLimits())
        caller_max = own.max_streams or self.settings.caller_max_streams
        if self._streams_by_caller.get(caller, 0) >= caller_max:
            raise self._refuse(
                "caller_streams",
                f"{caller} has {caller_max} streams open, its limit; close one (a run that "
                "ended: ReleaseCredentials) before opening another",
                f"caller:{caller}",
                None,
            )
        tenant_max = self.settings.tenant_max_streams
        if self._streams_by_tenant.get(tenant_id, 0) >= tenant_max:
            raise self._refuse(
                "tenant_streams",
                f"tenant {tenant_id!r} has {tenant_max} streams open, its limit; close one "
                "(ReleaseCredentials for runs that ended) before opening another",
                f"tenant:{tenant_id}",
                None,
            )
        _add(self._streams_by_caller, caller, 1)
        _add(self._streams_by_tenant, tenant_id, 1)
        try:
            yield
        finally:
            _add(self._streams_by_caller, caller, -1)
            _add(self._streams_by_tenant, tenant_id, -1)

    @contextlib.contextmanager
    def verifying(self, tenant_id: str) -> Iterator[None]:
        """Hold one of the tenant's VerifyRole slots while inside."""
        most = self.settings.tenant_verify_concurrency
        if self._verifying.get(tenant_id, 0) >= most:
            raise self._refuse(
                "tenant_verify",
                f"tenant {tenant_id!r} has {most} VerifyRole calls in flight, its limit; "
                "retry when they end",
                f"tenant:{tenant_id}",
                VERIFY_RETRY_AFTER,
            )
        _add(self._verifying, tenant_id, 1)
        try:
            yield
        finally:
            _add(self._verifying, tenant_id, -1)

    @contextlib.asynccontextmanager
    async def sts_slot(self, tenant_id: str) -> AsyncIterator[None]:
        """Hold one of the tenant's share of STS slots while inside (waiting for one)."""
        held = self._sts_slots.get(tenant_id)
        if held is None:
            held = (asyncio.Semaphore(self.settings.tenant_sts_concurrency), [0])
            self._sts_slots[tenant_id] = held
        slots, users = held
        users[0] += 1
        try:
            if slots.locked():
                self.hits.labels("tenant_sts_concurrency").inc()
            async with slots:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._sts_slots[tenant_id]


SETTING_OF: dict[Limit, str] = {
    "tenant_sts_rate": "BROKER_TENANT_STS_RATE",
    "caller_tenant_rate": "BROKER_CALLER_TENANT_RATE",
    "tenant_sts_concurrency": "BROKER_TENANT_STS_CONCURRENCY",
    "tenant_streams": "BROKER_TENANT_MAX_STREAMS",
    "caller_streams": "BROKER_CALLER_MAX_STREAMS",
    "tenant_verify": "BROKER_TENANT_VERIFY_CONCURRENCY",
}


def _add(counts: dict[str, int], key: str, step: int) -> None:
    value = counts.get(key, 0) + step
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)


class TenantShare:
    """Wraps the STS source: a tenant's AssumeRole calls take one of its share of STS slots
    (BROKER_TENANT_STS_CONCURRENCY) before one of the broker's (BROKER_STS_MAX_CONCURRENCY), so
    one tenant's burst waits behind its own share and leaves the rest to the others."""

    def __init__(self, source: CredentialSource, limits: Limits) -> None:
        self._source = source
        self._limits = limits

    async def get(self, grant: Grant) -> Credentials:
        async with self._limits.sts_slot(grant.tenant_id):
            return await self._source.get(grant)
