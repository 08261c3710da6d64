"""The credential cache: a `CredentialSource` that wraps another (the STS source).

- Single flight: concurrent calls for one run make one STS call.
- Two refresh points (`refresh_points`), as AWS SDKs have two windows: before the advisory point
  an entry is served; between it and the mandatory point it is still served at once, and the
  first such call starts one renewal in the background; past the mandatory point a call waits
  for the renewal.
- Stale-while-error: when renewal fails transiently, still-valid credentials are served and
  renewal backs off.
- Bounded: at most `max_entries` runs. When full, the least recently used run of the tenant
  holding the most goes (fair eviction), so a tenant within its share is never evicted by
  another's churn. Swept of expired entries.
- Evicted per tenant on disconnect or role change; a permanent AWS refusal drops the tenant too.
- `admit` is asked before a new run's first STS call (per-tenant limits on new sessions).
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
# Longest a call holding valid credentials waits past the mandatory point for their renewal
# (seconds; STS answers in well under 1 s when it is well): then it is served those.
MANDATORY_WAIT = 2.0
MAX_RETRY_PAUSE = 30.0  # seconds, between renewal attempts of one run while STS fails


def refresh_point(credentials: Credentials, margin: float) -> float:
    """When credentials are due for renewal (epoch seconds): `margin` before expiry, or half-way
    through a lifetime too short for the margin (so short sessions are not renewed every call).
    The advisory point of `refresh_points`; streams renew (with jitter) before it."""
    return credentials.expiration.timestamp() - min(margin, credentials.lifetime / 2)


def refresh_points(
    credentials: Credentials, margin: float, mandatory: float
) -> tuple[float, float]:
    """The advisory and the mandatory refresh points (epoch seconds). Advisory: `margin` before
    expiry, at most half the lifetime (`refresh_point`). Mandatory: `mandatory` before expiry,
    at most half the advisory lead, by the same rule; so always after the advisory point."""
    expiry = credentials.expiration.timestamp()
    lead = min(margin, credentials.lifetime / 2)
    return expiry - lead, expiry - min(mandatory, lead / 2)


@dataclass(slots=True)
class _Entry:
    grant: Grant
    credentials: Credentials
    refresh_at: float  # the advisory point: a call from here on starts a background renewal
    due_at: float  # the mandatory point: a call from here on waits for a renewal
    failures: int = 0  # transient renewal failures in a row
    retry_at: float = 0.0  # no renewal is tried before this, after a transient failure


# `get`'s stand-in for a tenant with no entry: always empty.
_NO_RUNS: OrderedDict[str, _Entry] = OrderedDict()


@dataclass(slots=True)
class _Flight:
    """One STS call under way for a grant."""

    task: asyncio.Task[Credentials]
    waiting: int = 0  # callers awaiting it; when the last one leaves, the call is cancelled…
    background: bool = False  # … unless a background renewal rides on it: then it runs on


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale_served: int = 0
    evictions: int = 0
    background_renewals: int = 0  # renewals a call in the advisory window set running on its own
    background_failures: int = 0  # of those, the ones that failed (transient or refused)


class CredentialCache:
    """Credentials by (tenant, run), held in this process's memory only.

    Fields (all changed only on the event loop):
    - `_by_tenant`: tenant → its runs' entries, least recently used first; `get` reorders,
      `_put` (a settled STS call) adds, `release`, `evict_tenant`, `sweep` and the size bound
      remove. A tenant with no entry has no key.
    - `_size`: entries in all of `_by_tenant`.
    - `_holding`: n → the tenants holding n entries (n ≥ 1), in the order they came to hold n;
      `_most`: the largest such n. Kept by `_recount` on every add and remove, so the size bound
      finds the tenant to evict from in O(1).
    - `_inflight`: grant → the one STS call under way for it (single flight); `_start` adds,
      `_settle` removes, `evict_tenant` detaches the tenant's (later calls start afresh).
    - `_epoch`: tenant → a counter `evict_tenant` bumps; a call that started under an older epoch
      does not store its result.
    """

    def __init__(
        self,
        source: CredentialSource,
        *,
        refresh_margin: float,
        max_entries: int,
        refresh_mandatory: float | None = None,
        admit: Callable[[Grant], None] | None = None,
        stale_floor: float = 5.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        """`refresh_mandatory` unset: half the advisory lead. `admit(grant)` is called before an
        STS call for a run the cache holds no entry for (not when joining one under way, nor
        for renewals); what it raises reaches the caller, and no call is made."""
        self._source = source
        self._margin = refresh_margin
        self._mandatory = float("inf") if refresh_mandatory is None else refresh_mandatory
        self._max_entries = max_entries
        self._admit = admit
        self._stale_floor = stale_floor
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._by_tenant: dict[str, OrderedDict[str, _Entry]] = {}
        self._size = 0
        self._holding: dict[int, dict[str, None]] = {}
        self._most = 0
        self._inflight: dict[Grant, _Flight] = {}
        self._epoch: dict[str, int] = {}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return self._size

    def fresh(self, grant: Grant) -> Credentials | None:
        """The credentials cached for `grant` if they are before their refresh point (a hit
        with nothing else to do), else None: `get` then decides."""
        runs = self._by_tenant.get(grant.tenant_id, _NO_RUNS)
        held = runs.get(grant.run_id)
        if held is None or held.grant != grant or self._clock() >= held.refresh_at:
            return None
        runs.move_to_end(grant.run_id)
        self.stats.hits += 1
        return held.credentials

    async def get(self, grant: Grant, *, newer_than: str | None = None) -> Credentials:
        """Credentials for `grant`: the cached ones until their mandatory refresh point
        (renewed in the background after the advisory one), else renewed. With `newer_than`
        (an access key id the caller already has), credentials other than those and before
        their advisory point, renewing if need be."""
        runs = self._by_tenant.get(grant.tenant_id, _NO_RUNS)
        held = runs.get(grant.run_id)
        entry = held if held is not None and held.grant == grant else None
        now = self._clock()
        if entry is not None and entry.credentials.access_key_id != newer_than:
            if now < entry.refresh_at:
                runs.move_to_end(grant.run_id)
                self.stats.hits += 1
                return entry.credentials
            if newer_than is None and now < entry.due_at:
                # The advisory window: answered at once; the first call (past any back-off)
                # starts the renewal, which later calls and any waiter share.
                if now >= entry.retry_at:
                    self._renew_in_background(grant)
                runs.move_to_end(grant.run_id)
                self.stats.hits += 1
                return entry.credentials
        if entry is not None and now < entry.retry_at and newer_than is None:
            # STS failed for this run moments ago: callers with valid credentials to be served
            # do not ask it again yet. (Streams pace their own retries.)
            return self._stale(entry, newer_than, TransientAwsError("STS is failing; retry"))
        if (
            held is None
            and self._admit is not None
            and grant not in self._inflight
            and newer_than is None
        ):
            self._admit(grant)  # a new run: its first STS session
        self.stats.misses += 1
        if entry is not None and newer_than is None:
            return await self._renewed_or_stale(grant, entry)
        try:
            return await self._fetch(grant)
        except TransientAwsError as failure:
            if entry is None:
                raise
            return self._stale(entry, newer_than, failure)  # `_settle` backed off

    async def _renewed_or_stale(self, grant: Grant, entry: _Entry) -> Credentials:
        """Past the mandatory point, a caller whose run holds valid credentials waits for
        their renewal, but at most MANDATORY_WAIT: a renewal slower than that (STS hanging,
        botocore retrying) runs on in the background, the run backs off as after a failure,
        and this caller, and the next ones until the back-off ends, are served the still-valid
        credentials (stale-while-error). So no caller holding valid credentials waits on STS
        for longer than that, whatever its own deadline."""
        flight = self._inflight.get(grant) or self._start(grant)
        flight.waiting += 1
        try:
            return await asyncio.wait_for(asyncio.shield(flight.task), MANDATORY_WAIT)
        except TimeoutError:
            flight.background = True  # runs on: its answer serves the next callers
            self._back_off(grant)
            slow = TransientAwsError(f"STS did not answer within {MANDATORY_WAIT:g} s; retry")
            return self._stale(entry, None, slow)
        except TransientAwsError as failure:
            return self._stale(entry, None, failure)  # `_settle` backed off
        finally:
            flight.waiting -= 1
            if not flight.waiting and not flight.background and not flight.task.done():
                flight.task.cancel()  # every caller gave up (its deadline): as in `_fetch`

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

    def _renew_in_background(self, grant: Grant) -> None:
        """Make sure a renewal of `grant` is under way that runs to its end whoever waits for
        it (starting one, or keeping the one a caller started)."""
        flight = self._inflight.get(grant) or self._start(grant)
        if not flight.background:
            flight.background = True
            self.stats.background_renewals += 1

    async def _fetch(self, grant: Grant) -> Credentials:
        flight = self._inflight.get(grant) or self._start(grant)
        flight.waiting += 1
        try:
            # Shielded: a caller that gives up does not cancel the call the others wait on…
            return await asyncio.shield(flight.task)
        finally:
            flight.waiting -= 1
            if not flight.waiting and not flight.background and not flight.task.done():
                # … but when every caller has given up (deadlines, cancelled streams), the STS
                # call is abandoned too, instead of running on for nobody. A background
                # renewal runs on: its result is what the next callers will be served.
                flight.task.cancel()

    def _start(self, grant: Grant) -> _Flight:
        epoch = self._epoch.get(grant.tenant_id, 0)
        flight = _Flight(
            asyncio.create_task(self._source.get(grant), name=f"sts:{grant.tenant_id}")
        )
        self._inflight[grant] = flight
        flight.task.add_done_callback(lambda _: self._settle(grant, epoch, flight))
        return flight

    def _settle(self, grant: Grant, epoch: int, flight: _Flight) -> None:
        """A call ended (before any of its waiters resumes): store its result, or evict the
        tenant on a permanent refusal, or back the run's renewals off."""
        if self._inflight.get(grant) is flight:
            del self._inflight[grant]
        task = flight.task
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and flight.background:
            self.stats.background_failures += 1
        if isinstance(error, RoleNotAssumable):
            self.evict_tenant(grant.tenant_id)
        elif self._epoch.get(grant.tenant_id, 0) != epoch:
            return  # the tenant was evicted meanwhile (a Disconnect, a role change)
        elif error is None:
            if not flight.background or self._held(grant) is not None:
                # A background renewal replaces an entry; it never brings back a released one.
                self._put(grant, task.result())
        elif isinstance(error, TransientAwsError) or flight.background:
            # Any failure of a background renewal backs off too: otherwise every call in the
            # advisory window would start another.
            self._back_off(grant)

    def _held(self, grant: Grant) -> _Entry | None:
        runs = self._by_tenant.get(grant.tenant_id)
        entry = None if runs is None else runs.get(grant.run_id)
        return entry if entry is not None and entry.grant == grant else None

    def _back_off(self, grant: Grant) -> None:
        """No renewal of the run before a pause that doubles with each failure in a row, but
        never so long that the credentials run out before the next try."""
        entry = self._held(grant)
        if entry is None:
            return
        entry.failures += 1
        now = self._clock()
        valid_for = entry.credentials.expiration.timestamp() - now
        pause = min(2.0 ** (entry.failures - 1), MAX_RETRY_PAUSE, max(valid_for / 4, 0.1))
        entry.retry_at = now + pause * self._rng.uniform(0.5, 1.0)

    def _put(self, grant: Grant, credentials: Credentials) -> None:
        advisory, mandatory = refresh_points(credentials, self._margin, self._mandatory)
        runs = self._by_tenant.get(grant.tenant_id)
        if runs is None:
            runs = self._by_tenant[grant.tenant_id] = OrderedDict()
        renewed = grant.run_id in runs
        runs[grant.run_id] = _Entry(grant, credentials, advisory, mandatory)
        runs.move_to_end(grant.run_id)
        if renewed:
            return
        self._size += 1
        self._recount(grant.tenant_id, len(runs) - 1, len(runs))
        while self._size > self._max_entries:
            # Fair eviction: from the tenant holding the most (of those, the one that came to
            # hold that many first), its least recently used run.
            tenant = next(iter(self._holding[self._most]))
            self._remove((tenant, next(iter(self._by_tenant[tenant]))))
            self.stats.evictions += 1

    def _recount(self, tenant_id: str, before: int, after: int) -> None:
        """Move the tenant from `_holding[before]` to `_holding[after]` (one apart)."""
        if before:
            bucket = self._holding[before]
            del bucket[tenant_id]
            if not bucket:
                del self._holding[before]
                if self._most == before:
                    self._most = after  # it lost one: nobody holds more than it now
        if after:
            self._holding.setdefault(after, {})[tenant_id] = None
            self._most = max(self._most, after)

    def _remove(self, key: Key) -> None:
        runs = self._by_tenant.get(key[0])
        if runs is None or runs.pop(key[1], None) is None:
            return
        self._size -= 1
        self._recount(key[0], len(runs) + 1, len(runs))
        if not runs:
            del self._by_tenant[key[0]]

    async def close(self) -> None:
        """Cancel every STS call under way (background renewals included) and wait for them:
        at shutdown, before the AWS client closes under them."""
        tasks = [flight.task for flight in self._inflight.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def in_flight(self) -> int:
        """STS calls under way."""
        return len(self._inflight)

    def tenants(self) -> list[str]:
        return list(self._by_tenant)

    def grants_of(self, tenant_id: str) -> list[Grant]:
        """The grants the tenant's cached credentials were issued under."""
        return [entry.grant for entry in self._by_tenant.get(tenant_id, {}).values()]

    def release(self, tenant_id: str, run_id: str) -> None:
        """Forget one run's credentials (the run ended)."""
        self._remove((tenant_id, run_id))

    def evict_tenant(self, tenant_id: str) -> None:
        """Forget every credential of a tenant, including those being fetched right now: their
        results are not stored, later calls do not join them, and a background renewal that
        nobody waits for is cancelled."""
        self._epoch[tenant_id] = self._epoch.get(tenant_id, 0) + 1
        for run_id in list(self._by_tenant.get(tenant_id, ())):
            self._remove((tenant_id, run_id))
        for grant in [g for g in self._inflight if g.tenant_id == tenant_id]:
            flight = self._inflight.pop(grant)
            if not flight.waiting:
                flight.task.cancel()

    def sweep(self) -> int:
        """Drop expired entries; returns how many went."""
        now = self._clock()
        expired = [
            (tenant_id, run_id)
            for tenant_id, runs in self._by_tenant.items()
            for run_id, entry in runs.items()
            if entry.credentials.expiration.timestamp() <= now
        ]
        for key in expired:
            self._remove(key)
        return len(expired)
