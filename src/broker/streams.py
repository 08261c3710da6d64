"""WatchCredentials streams: who is watching which run, and how each stream is ended or woken.

`StreamHub` only keeps the book; `watch()` is the loop one stream runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from broker.cache import refresh_point
from broker.errors import BrokerError, TransientAwsError, Unavailable
from broker.models import Credentials, Grant

log = logging.getLogger(__name__)

Key = tuple[str, str]
# A renewal happens up to this fraction of the time before the refresh point, chosen at random,
# so streams that started together do not all renew in the same second.
JITTER_FRACTION = 0.1
RETRY_BACKOFF_START = 1.0
RETRY_BACKOFF_MAX = 30.0


class Subscription:
    """One open stream. `ended` is set once (by the hub) with the error that ends the stream;
    `_wake` is set by the hub to end it or to make it re-read its grant at once."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.grant: Grant | None = None  # what the stream's credentials were issued under
        self.ended: BrokerError | None = None
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    def end(self, error: BrokerError) -> None:
        if self.ended is None:
            self.ended = error
        self._wake.set()

    def woken(self) -> bool:
        """Whether the hub woke the stream since it last slept (and forget it). Raises `ended`
        once set."""
        if self.ended is not None:
            raise self.ended
        woken = self._wake.is_set()
        self._wake.clear()
        return woken

    async def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when woken early (`woken`). Raises `ended` once set."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        return self.woken()


class StreamHub:
    """Open streams by run. `_streams` is changed by `subscribe`/`unsubscribe` (each stream's
    own task) and read by `end_run`, `end_tenant`, `wake_tenant`, `end_all` (RPCs, shutdown)."""

    def __init__(self) -> None:
        self._streams: dict[Key, set[Subscription]] = {}

    def __len__(self) -> int:
        return sum(len(subs) for subs in self._streams.values())

    def subscribe(self, key: Key) -> Subscription:
        subscription = Subscription(key)
        self._streams.setdefault(key, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subs = self._streams.get(subscription.key)
        if subs is not None:
            subs.discard(subscription)
            if not subs:
                del self._streams[subscription.key]

    def _matching(self, tenant_id: str) -> list[Subscription]:
        return [s for key, subs in self._streams.items() if key[0] == tenant_id for s in subs]

    def end_run(self, key: Key, error: BrokerError) -> None:
        for subscription in list(self._streams.get(key, ())):
            subscription.end(error)

    def end_tenant(self, tenant_id: str, error: BrokerError) -> None:
        for subscription in self._matching(tenant_id):
            subscription.end(error)

    def tenants(self) -> list[str]:
        return list({key[0] for key in self._streams})

    def watching(self, tenant_id: str) -> bool:
        """Whether any stream of the tenant is open."""
        return any(key[0] == tenant_id for key in self._streams)

    def grants_of(self, tenant_id: str) -> list[Grant]:
        return [s.grant for s in self._matching(tenant_id) if s.grant is not None]

    def wake_tenant(self, tenant_id: str) -> None:
        """Make the tenant's streams fetch again now (its role changed)."""
        for subscription in self._matching(tenant_id):
            subscription.wake()

    def end_all(self, error: BrokerError) -> None:
        for subs in list(self._streams.values()):
            for subscription in list(subs):
                subscription.end(error)


async def watch(
    subscription: Subscription,
    fetch: Callable[[str | None], Awaitable[tuple[Grant, Credentials]]],
    *,
    refresh_margin: float,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> AsyncIterator[tuple[Grant, Credentials]]:
    """Yield the run's grant and credentials now, then new ones before each refresh point,
    until the subscription is ended. `fetch(newer_than)` reads the grant and gets its
    credentials (other than the access key `newer_than`, renewing if need be). Transient STS
    errors are retried while the held credentials are valid; they end the stream
    (UNAVAILABLE) only once those have expired. Nothing fetched while the hub woke or ended
    the stream (a Disconnect, a role change) is sent: it is fetched again, or the stream ends."""
    rng = rng or random.Random()  # noqa: S311 - jitter, not security
    grant, held = await fetch(None)
    while subscription.woken():  # raises the error that ended it
        grant, held = await fetch(None)
    subscription.grant = grant
    yield grant, held
    backoff = RETRY_BACKOFF_START
    delay = _renewal_delay(held, refresh_margin, clock(), rng)
    woken_meanwhile = False
    while True:
        woken = await subscription.sleep(delay) or woken_meanwhile
        woken_meanwhile = False
        try:
            grant, fresh = await fetch(None if woken else held.access_key_id)
        except TransientAwsError:
            remaining = held.expiration.timestamp() - clock()
            if remaining <= 0:
                raise Unavailable("STS is unavailable and this run's credentials expired") from None
            # Full jitter (streams that failed together do not retry together), and retries
            # come closer together as expiry nears, so recovery is not missed.
            delay = min(rng.uniform(0, backoff), max(remaining / 4, 0.1))
            backoff = min(backoff * 2, RETRY_BACKOFF_MAX)
            log.warning("renewal failed transiently; retrying", extra={"retry_in": delay})
            continue
        backoff = RETRY_BACKOFF_START
        if subscription.woken():  # changed while fetching: read the grant again first
            woken_meanwhile, delay = True, 0.0
            continue
        subscription.grant = grant
        if fresh.access_key_id != held.access_key_id:
            held = fresh
            yield grant, held
        delay = _renewal_delay(held, refresh_margin, clock(), rng)


def _renewal_delay(
    credentials: Credentials, margin: float, now: float, rng: random.Random
) -> float:
    due = refresh_point(credentials, margin)
    served_for = max(due - credentials.issued_at.timestamp(), 0.0)
    return max(0.0, due - now - rng.random() * JITTER_FRACTION * served_for)
