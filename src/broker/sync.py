"""Keeping this replica's cache and streams in step with the store, which other replicas change.

A change is heard at once through the store's notifications (`on_change`); a periodic re-check
of every tenant this replica holds anything for catches what a lost notification missed.
Either way the tenant's connection is read again, and its cached credentials and streams are
dropped or refreshed only if what they were issued under is no longer what the store says.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from broker.cache import CredentialCache
from broker.errors import BrokerError
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
    ) -> None:
        self._store = store
        self._cache = cache
        self._hub = hub
        self._forget = forget  # drops a tenant's grant remembered by Connections
        self._pending: dict[str, asyncio.Task[None]] = {}

    def on_change(self, tenant_id: str) -> None:
        """A replica changed the tenant: its grant is read again by the next call, and what is
        held for it is re-checked (soon, once)."""
        self._forget(tenant_id)
        if tenant_id not in self._pending:
            task = asyncio.create_task(self.recheck(tenant_id), name=f"recheck:{tenant_id}")
            self._pending[tenant_id] = task
            task.add_done_callback(lambda _: self._pending.pop(tenant_id, None))

    def on_missed(self) -> None:
        """Notifications may have been lost: re-check every tenant held."""
        for tenant_id in self.held_tenants():
            self.on_change(tenant_id)

    def held_tenants(self) -> set[str]:
        return set(self._cache.tenants()) | set(self._hub.tenants())

    async def recheck(self, tenant_id: str) -> None:
        try:
            connection = await self._store.get(tenant_id)
        except BrokerError as exc:
            log.warning("cannot re-check tenant", extra={"tenant": tenant_id, "error": str(exc)})
            return
        current = (
            (connection.role_arn, connection.external_id)
            if connection is not None and connection.status is Status.ACTIVE
            else None
        )
        held = self._cache.grants_of(tenant_id) + self._hub.grants_of(tenant_id)
        if any(_issued_under(grant) != current for grant in held):
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

        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(one(t) for t in sorted(self.held_tenants())))

    async def recheck_forever(self, interval: float) -> None:
        """The safety net: every `interval` seconds, re-check every tenant held."""
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(self.recheck(t) for t in self.held_tenants()))
