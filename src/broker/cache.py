"""The credential cache: a `CredentialSource` that wraps another (the STS source).

- Single flight: concurrent misses for one run make one STS call.
- Refresh ahead: an entry is served until its refresh point (`refresh_point`), then renewed.
- Stale-while-error: when renewal fails transiently, still-valid credentials are served.
- Bounded: at most `max_entries` runs (least recently used go first), swept of expired entries.
- Evicted per tenant on disconnect or role change; a permanent AWS refusal drops the tenant too.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from broker.credentials import CredentialSource
from broker.errors import RoleNotAssumable, TransientAwsError
from broker.models import Credentials, Grant

Key = tuple[str, str]
MAX_RETRY_PAUSE = 30.0  # seconds, between renewal attempts of one run while STS fails


def refresh_point(credentials: Credentials, margin: float) -> float:
    """When credentials are due for renewal (epoch seconds): `margin` before expiry, or half-way
    through a lifetime too short for the margin (so short sessions are not renewed every call)."""
    lifetime = credentials.lifetime
    lead = min(margin, lifetime / 2)
    return credentials.expiration.timestamp() - lead


@dataclass
class _Entry:
    grant: Grant
    credentials: Credentials
    refresh_at: float
    failures: int = 0  # transient renewal failures in a row
    retry_at: float = 0.0  # no renewal is tried before this, after a transient failure


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale_served: int = 0
    evictions: int = 0


class CredentialCache:
    """Credentials by (tenant, run), held in this process's memory only.

    Fields (all changed only on the event loop):
    - `_entries`: key → entry, least recently used first; `get` adds and reorders, `release`,
      `evict_tenant`, `sweep` and the size bound remove.
    - `_by_tenant`: tenant → its run ids in `_entries`, so a tenant is evicted without a scan.
    - `_inflight`: grant → the one STS call under way for it (single flight).
    - `_waiting`: grant → how many callers await that call; the last to leave cancels it.
    - `_epoch`: tenant → a counter `evict_tenant` bumps; a call that started under an older epoch
      does not store its result.
    """

    def __init__(
        self,
        source: CredentialSource,
        *,
        refresh_margin: float,
        max_entries: int,
        stale_floor: float = 5.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._source = source
        self._margin = refresh_margin
        self._max_entries = max_entries
        self._stale_floor = stale_floor
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._by_tenant: dict[str, set[str]] = {}
        self._inflight: dict[Grant, asyncio.Task[Credentials]] = {}
        self._waiting: dict[Grant, int] = {}
        self._epoch: dict[str, int] = {}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, grant: Grant, *, newer_than: str | None = None) -> Credentials:
        """Credentials for `grant` before their refresh point. With `newer_than` (an access key
        id the caller already has), credentials other than those, renewing if need be."""
        entry = self._entries.get(grant.key)
        now = self._clock()
        if entry is not None and entry.grant != grant:
            entry = None
        if (
            entry is not None
            and now < entry.refresh_at
            and entry.credentials.access_key_id != newer_than
        ):
            self._entries.move_to_end(grant.key)
            self.stats.hits += 1
            return entry.credentials
        if entry is not None and now < entry.retry_at and newer_than is None:
            # STS failed for this run moments ago: callers with valid credentials to be served
            # do not ask it again yet. (Streams pace their own retries.)
            return self._stale(entry, newer_than, TransientAwsError("STS is failing; retry"))
        self.stats.misses += 1
        try:
            return await self._fetch(grant)
        except TransientAwsError as failure:
            if entry is None:
                raise
            entry.failures += 1
            now = self._clock()
            # Back off, but never so long that the credentials run out before the next try.
            valid_for = entry.credentials.expiration.timestamp() - now
            pause = min(2.0 ** (entry.failures - 1), MAX_RETRY_PAUSE, max(valid_for / 4, 0.1))
            entry.retry_at = now + pause * self._rng.uniform(0.5, 1.0)
            return self._stale(entry, newer_than, failure)

    def _stale(
        self, entry: _Entry, newer_than: str | None, failure: TransientAwsError
    ) -> Credentials:
        """Stale-while-error: still-valid credentials beat none (not ones about to expire), for
        a caller that has none; one that wants newer ones (a stream) gets the failure."""
        floor = min(self._stale_floor, entry.credentials.lifetime / 10)
        valid_for = entry.credentials.expiration.timestamp() - self._clock()
        if newer_than is None and valid_for > floor:
            self.stats.stale_served += 1
            return entry.credentials
        raise failure

    async def _fetch(self, grant: Grant) -> Credentials:
        task = self._inflight.get(grant)
        if task is None:
            epoch = self._epoch.get(grant.tenant_id, 0)
            task = asyncio.create_task(self._source.get(grant), name=f"sts:{grant.tenant_id}")
            self._inflight[grant] = task
            task.add_done_callback(lambda done: self._settle(grant, epoch, done))
        self._waiting[grant] = self._waiting.get(grant, 0) + 1
        try:
            # Shielded: a caller that gives up does not cancel the call the others wait on…
            return await asyncio.shield(task)
        finally:
            left = self._waiting.pop(grant) - 1
            if left:
                self._waiting[grant] = left
            elif not task.done():
                # … but when every caller has given up (deadlines, cancelled streams), the STS
                # call is abandoned too, instead of running on for nobody.
                task.cancel()

    def _settle(self, grant: Grant, epoch: int, task: asyncio.Task[Credentials]) -> None:
        if self._inflight.get(grant) is task:
            del self._inflight[grant]
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, RoleNotAssumable):
            self.evict_tenant(grant.tenant_id)
        elif error is None and self._epoch.get(grant.tenant_id, 0) == epoch:
            credentials = task.result()
            self._put(grant, credentials)

    def _put(self, grant: Grant, credentials: Credentials) -> None:
        self._entries[grant.key] = _Entry(
            grant, credentials, refresh_point(credentials, self._margin)
        )
        self._entries.move_to_end(grant.key)
        self._by_tenant.setdefault(grant.tenant_id, set()).add(grant.run_id)
        while len(self._entries) > self._max_entries:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.stats.evictions += 1

    def _remove(self, key: Key) -> None:
        if self._entries.pop(key, None) is None:
            return
        runs = self._by_tenant.get(key[0])
        if runs is not None:
            runs.discard(key[1])
            if not runs:
                del self._by_tenant[key[0]]

    @property
    def in_flight(self) -> int:
        """STS calls under way."""
        return len(self._inflight)

    def tenants(self) -> list[str]:
        return list(self._by_tenant)

    def grants_of(self, tenant_id: str) -> list[Grant]:
        """The grants the tenant's cached credentials were issued under."""
        runs = self._by_tenant.get(tenant_id, ())
        return [self._entries[(tenant_id, run)].grant for run in runs]

    def release(self, tenant_id: str, run_id: str) -> None:
        """Forget one run's credentials (the run ended)."""
        self._remove((tenant_id, run_id))

    def evict_tenant(self, tenant_id: str) -> None:
        """Forget every credential of a tenant, including those being fetched right now."""
        self._epoch[tenant_id] = self._epoch.get(tenant_id, 0) + 1
        for run_id in list(self._by_tenant.get(tenant_id, ())):
            self._remove((tenant_id, run_id))

    def sweep(self) -> int:
        """Drop expired entries; returns how many went."""
        now = self._clock()
        expired = [
            k for k, e in self._entries.items() if e.credentials.expiration.timestamp() <= now
        ]
        for key in expired:
            self._remove(key)
        return len(expired)
