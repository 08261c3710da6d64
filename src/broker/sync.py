"""Keeping this replica's cache and streams in step with the store, which other replicas change.

A change is heard at once through the store's notifications (`on_change`); a periodic re-check
of every tenant this replica holds anything for catches what a lost notification missed.
Either way the tenant's connection is read again, and its cached credentials and streams are
dropped or refreshed only if what they were issued under is no longer what the store says.

None of this ever stops for good: a failure (the store down or hung, or a bug) is logged,
counted in `broker_background_errors{loop}`, and the next notification or pass tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from broker.cache import CredentialCache
from broker.errors import BrokerError
from broker.metrics import Loop, Metrics
from broker.models import Grant, Status
from broker.store import ConnectionStore
from broker.streams import StreamHub

log = logging.getLogger(__name__)

REVERIFY_CONCURRENCY = 4  # tenants whose roles are probed at once (3 AssumeRole calls each)


def _issued_under(grant: Grant) -> tuple[str, str]:
    return (grant.role_arn, grant.external_id)


class TenantSync:
    """Re-reads tenants and invalidates what changed. `_pending` holds the re-checks under way
    (one task per tenant at a time; changed by `on_change` and the tasks themselves)."""

    def __init__(
        self,
        store: ConnectionStore,
        cache: CredentialCache,
        hub: StreamHub,
        forget: Callable[[str], None] = lambda _: None,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._cache = cache
        self._hub = hub
        self._forget = forget  # drops a tenant's grant remembered by Connections
        self._metrics = metrics
        self._pending: dict[str, asyncio.Task[None]] = {}
        # Tenants changed again while their re-check was under way: re-checked once more.
        self._again: set[str] = set()

    def on_change(self, tenant_id: str) -> None:
        """A replica changed the tenant: its grant is read again by the next call, and what is
        held for it is re-checked (soon, once)."""
        self._forget(tenant_id)
        if tenant_id in self._pending:
            # The re-check under way may have read the store before this change: run it again
            # once it is done.
            self._again.add(tenant_id)
            return
        task = asyncio.create_task(self.recheck(tenant_id, "change"), name=f"recheck:{tenant_id}")
        self._pending[tenant_id] = task
        task.add_done_callback(lambda _: self._rechecked(tenant_id))

    def _rechecked(self, tenant_id: str) -> None:
        self._pending.pop(tenant_id, None)
        if tenant_id in self._again:
            self._again.discard(tenant_id)
            self.on_change(tenant_id)

    def on_missed(self) -> None:
        """Notifications may have been lost: re-check every tenant held."""
        for tenant_id in self.held_tenants():
            self.on_change(tenant_id)

    def on_listener_error(self) -> None:
        """The store's listener lost its connection or could not make one (it comes back by
        itself, and calls `on_missed`)."""
        self._failed("listener")

    def held_tenants(self) -> set[str]:
        return set(self._cache.tenants()) | set(self._hub.tenants())

    async def recheck(self, tenant_id: str, loop: Loop = "change") -> None:
        """Re-read the tenant and drop what is held under a grant that changed. Never raises
        (but when cancelled): a failure is logged and counted under `loop`."""
        try:
            await self._recheck(tenant_id)
        except BrokerError as exc:  # the store is unavailable: the next re-check tries again
            log.warning("cannot re-check tenant", extra={"tenant": tenant_id, "error": str(exc)})
            self._failed(loop)
        except Exception:
            log.exception("re-check failed", extra={"tenant": tenant_id})
            self._failed(loop)

    async def _recheck(self, tenant_id: str) -> None:
        connection = await self._store.get(tenant_id)
        current = (
            (connection.role_arn, connection.external_id)
            if connection is not None and connection.status is Status.ACTIVE
            else None
        )
        held = self._cache.grants_of(tenant_id) + self._hub.grants_of(tenant_id)
        # Not ACTIVE: every stream of the tenant is woken, those whose first credentials are
        # still on their way too (they hold no grant yet); woken, each reads its grant again.
        stale = current is None and self._hub.watching(tenant_id)
        if stale or any(_issued_under(grant) != current for grant in held):
            log.info(
                "tenant changed elsewhere; dropping its credentials", extra={"tenant": tenant_id}
            )
            self._cache.evict_tenant(tenant_id)
            self._hub.wake_tenant(tenant_id)

    async def reverify_forever(
        self, interval: float, recheck_role: Callable[[str], Awaitable[object]]
    ) -> None:
        """Every `interval` seconds, VerifyRole's checks again on the role of every tenant held
        (`Connections.recheck_role`, which suspends a connection whose role fails them), a few
        tenants at a time. The loop outlives any one failure."""
        slots = asyncio.Semaphore(REVERIFY_CONCURRENCY)

        async def one(tenant_id: str) -> None:
            async with slots:
                try:
                    await recheck_role(tenant_id)
                except Exception:
                    log.exception("role re-check failed", extra={"tenant": tenant_id})
                    self._failed("reverify")

        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.gather(*(one(t) for t in sorted(self.held_tenants())))
            except Exception:  # `one` keeps its own; this is anything else
                log.exception("role re-check pass failed")
                self._failed("reverify")

    async def recheck_forever(self, interval: float) -> None:
        """The safety net: every `interval` seconds, re-check every tenant held. The loop
        outlives any one failure."""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.gather(*(self.recheck(t, "recheck") for t in self.held_tenants()))
            except Exception:  # `recheck` keeps its own; this is anything else
                log.exception("re-check pass failed")
                self._failed("recheck")

    def _failed(self, loop: Loop) -> None:
        if self._metrics is not None:
            self._metrics.background_error(loop)
