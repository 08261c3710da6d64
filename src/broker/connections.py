"""Connection lifecycle (create, verify, get, disconnect), external IDs, and VerifyRole's checks.

One connection per tenant: PENDING → (VerifyRole) → ACTIVE → (Disconnect) → DISCONNECTED →
(CreateConnection) → PENDING with a new external ID. An ACTIVE connection whose role fails the
checks again (the periodic re-check, or VerifyRole on it) is SUSPENDED: nothing is issued until
VerifyRole passes again. A role is held by one tenant at most (ACTIVE or SUSPENDED).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from broker import audit
from broker.aws import AssumeRoleRequest, AwsClient
from broker.credentials import run_request, session_policy_arns
from broker.errors import (
    Aborted,
    AlreadyExists,
    BrokerError,
    GrantChanged,
    NotActive,
    NotFound,
    RoleNotAssumable,
    Unavailable,
    VerificationFailed,
)
from broker.models import Check, Connection, Credentials, Event, Grant, Status
from broker.store import ConnectionStore, RoleInUse, StoreConflict, StoreUnavailable
from broker.store.rows import role_key
from broker.template import quick_create_url, stack_name
from broker.trust import admits_only

log = logging.getLogger(__name__)

EXTERNAL_ID_BYTES = 24  # 192 bits from `secrets`; DESIGN.md asks for at least 128.
VERIFY_SESSION_NAME = "credential-broker-verify"
VERIFY_PROBE_DURATION = 900  # the shortest AWS allows: a probe that wrongly succeeds expires soon
STORE_RETRIES = 5
CONFIRM_READS = 3  # reads of a grant after a mint, while changes keep arriving
# How long a grant read from the store is trusted without reading it again. A change made on
# this replica, or heard from another (TenantSync), is seen at once; this bounds how long a
# change whose notification was lost can go unseen by IssueCredentials.
GRANT_FRESH_SECONDS = 1.0
# VerifyRole's checks, in the order they run; the periodic re-check runs the same ones.
ROLE_NOT_SHARED = "role_not_used_by_another_tenant"
WITH_ID = "assume_with_external_id"
WITHOUT_ID_DENIED = "assume_without_external_id_denied"
OTHER_ID_DENIED = "assume_with_other_external_id_denied"
TRUST_POLICY = "trust_policy_requires_external_id"
RECHECK_ACTOR = "broker:recheck"


def new_external_id() -> str:
    return secrets.token_urlsafe(EXTERNAL_ID_BYTES)


@dataclass(frozen=True)
class Settings:
    """The part of the broker's configuration the connection lifecycle needs."""

    template_url: str
    trusted_principal_arn: str
    default_region: str
    session_duration: int
    policy_arns: Sequence[str]
    verify_wait: float
    grant_max_staleness: float = 30.0
    store_read_timeout: float = 0.2


class Connections:
    """The lifecycle rules of DESIGN.md over a ConnectionStore. Calls `on_role_changed(tenant)`,
    `on_disconnected(tenant)` and `on_suspended(tenant)` after the change is stored, so caches
    and streams follow."""

    def __init__(
        self,
        store: ConnectionStore,
        aws: AwsClient,
        settings: Settings,
        *,
        on_role_changed: Callable[[str], None] = lambda _: None,
        on_disconnected: Callable[[str], None] = lambda _: None,
        on_suspended: Callable[[str], None] = lambda _: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._aws = aws
        self.settings = settings
        self._on_role_changed = on_role_changed
        self._on_disconnected = on_disconnected
        self._on_suspended = on_suspended
        self._sleep = sleep
        self._clock = clock
        # tenant → (its last ACTIVE grant read from the store, when that read began); set by
        # `_read_now`, dropped by `forget` (every change saved here, every one heard of).
        self._last_grants: dict[str, tuple[Grant, float]] = {}
        # tenant → how many times its connection changed here or was heard to change; bumped
        # by `forget`. A read that began before a change does not keep what it read, and a
        # caller that saw it move while fetching credentials reads the grant again.
        self._generations: dict[str, int] = {}
        # tenant → the store read under way for it (`_read`); dropped when done or forgotten.
        self._reads: dict[str, asyncio.Task[Connection | None]] = {}

    async def get(self, tenant_id: str) -> Connection:
        connection = await self._store.get(tenant_id)
        if connection is None:
            raise NotFound(f"no connection for tenant {tenant_id!r}; CreateConnection starts one")
        return connection

    def fresh_grant(self, tenant_id: str, run_id: str) -> Grant | None:
        """What `run_id` may be issued now, from the tenant's grant read here less than
        GRANT_FRESH_SECONDS ago (and not changed since); None when `grant` must read it."""
        known = self._last_grants.get(tenant_id)
        if known is None or self._clock() - known[1] >= GRANT_FRESH_SECONDS:
            return None
        return known[0].for_run(run_id)

    async def grant(self, tenant_id: str, run_id: str) -> Grant:
        """What `run_id` may be issued now. NotFound / NotActive when nothing may be issued.
        A grant read less than GRANT_FRESH_SECONDS ago is not read again (the hot path makes no
        store round trip), and a read waits at most `store_read_timeout`. While the store cannot
        be read, the tenant's last grant read here stands in, whatever its age: it lets cached
        credentials be served again. Minting new ones under it is bounded by the staleness
        rule (`ensure_fresh`, `confirm`)."""
        grant = self.fresh_grant(tenant_id, run_id)
        if grant is not None:
            return grant
        try:
            connection = await self._read(tenant_id)
        except StoreUnavailable:
            known = self._last_grants.get(tenant_id)  # forgotten meanwhile: nothing stands in
            if known is None:
                raise
            return known[0].for_run(run_id)
        return self._active(tenant_id, connection).for_run(run_id)

    def _active(self, tenant_id: str, connection: Connection | None) -> Grant:
        """The grant of `connection` (read for `tenant_id`); NotFound / NotActive if none."""
        if connection is None:
            raise NotFound(f"no connection for tenant {tenant_id!r}; CreateConnection starts one")
        if connection.status is not Status.ACTIVE:
            raise NotActive(
                f"the connection of tenant {tenant_id!r} is {connection.status.value}, not ACTIVE: "
                + guidance(connection, self.settings.session_duration),
                subject=tenant_id,
                reason="CONNECTION_NOT_ACTIVE",
                metadata={"tenant_id": tenant_id, "status": connection.status.value},
            )
        return Grant(tenant_id, "", connection.role_arn, connection.external_id, connection.region)

    async def _read(self, tenant_id: str) -> Connection | None:
        """The tenant's connection from the store, waited for at most `store_read_timeout`
        (then StoreUnavailable: a hung store makes callers fall back, not wait). One read per
        tenant at a time; one that outlives its callers finishes, and what it read is kept
        unless the tenant changed meanwhile."""
        task = self._reads.get(tenant_id)
        if task is None:
            task = asyncio.create_task(self._read_now(tenant_id), name=f"read:{tenant_id}")
            self._reads[tenant_id] = task
            task.add_done_callback(lambda done: self._read_done(tenant_id, done))
        try:
            return await asyncio.wait_for(
                asyncio.shield(task), timeout=self.settings.store_read_timeout
            )
        except TimeoutError:
            raise StoreUnavailable(
                f"the store did not answer within {self.settings.store_read_timeout:g} s"
            ) from None

    async def _read_now(self, tenant_id: str) -> Connection | None:
        generation, started = self.generation(tenant_id), self._clock()
        connection = await self._store.get(tenant_id)
        if self.generation(tenant_id) == generation:
            if connection is not None and connection.status is Status.ACTIVE:
                grant = self._active(tenant_id, connection)
                self._last_grants[tenant_id] = (grant, started)
            else:
                self._last_grants.pop(tenant_id, None)
        return connection

    def _read_done(self, tenant_id: str, task: asyncio.Task[Connection | None]) -> None:
        if self._reads.get(tenant_id) is task:
            del self._reads[tenant_id]
        if not task.cancelled():
            task.exception()  # retrieved: its callers may all have stopped waiting

    def forget(self, tenant_id: str) -> None:
        """Read the tenant's grant from the store next time (it changed, or may have); a read
        under way now belongs to the time before, so later callers do not join it."""
        self._generations[tenant_id] = self._generations.get(tenant_id, 0) + 1
        self._last_grants.pop(tenant_id, None)
        self._reads.pop(tenant_id, None)

    def generation(self, tenant_id: str) -> int:
        """Changes to the tenant's connection made or heard here so far: credentials fetched
        while it moved may belong to a grant that no longer stands."""
        return self._generations.get(tenant_id, 0)

    def staleness(self, tenant_id: str) -> float | None:
        """Seconds since the store last confirmed the tenant's ACTIVE grant to this replica:
        by a read, or by the change-notification channel staying unbroken since that read
        (any change would have been heard). None when no grant is known."""
        known = self._last_grants.get(tenant_id)
        if known is None:
            return None
        confirmed = known[1]
        channel = self._store.channel_alive()
        if channel is not None and channel[0] <= confirmed:
            confirmed = max(confirmed, channel[1])
        return max(self._clock() - confirmed, 0.0)

    async def ensure_fresh(self, grant: Grant) -> None:
        """Before a new STS session is minted for `grant`: the bounded-staleness rule. The
        tenant's grant must be `grant` as confirmed within `grant_max_staleness`, else it is
        read now; StoreUnavailable when it cannot be, NotActive when it changed."""
        known = self._last_grants.get(grant.tenant_id)
        staleness = self.staleness(grant.tenant_id)
        if (
            known is not None
            and known[0] == grant.for_run("")
            and staleness is not None
            and staleness <= self.settings.grant_max_staleness
        ):
            return
        try:
            connection = await self._read(grant.tenant_id)
        except StoreUnavailable as exc:
            raise self._unconfirmed(grant.tenant_id, staleness) from exc
        self._still(grant, connection)

    async def confirm(self, grant: Grant, generation: int) -> None:
        """After a new STS session was minted for `grant`: the store is read again, so no
        session minted under a grant that a committed change ended (on any replica) is handed
        out (NotActive, or GrantChanged to retry). A read counts only if no change was made or
        heard here while it ran (else it is made again). If the store cannot be read, the
        session is handed out only if nothing was heard to change (`generation`) and the grant
        is within the staleness bound."""
        for _ in range(CONFIRM_READS):
            before = self.generation(grant.tenant_id)
            try:
                connection = await self._read(grant.tenant_id)
            except StoreUnavailable as exc:
                staleness = self.staleness(grant.tenant_id)
                if (
                    self.generation(grant.tenant_id) != generation
                    or staleness is None
                    or staleness > self.settings.grant_max_staleness
                ):
                    raise self._unconfirmed(grant.tenant_id, staleness) from exc
                return
            if self.generation(grant.tenant_id) == before:
                self._still(grant, connection)
                return
        raise GrantChanged(f"the connection of tenant {grant.tenant_id!r} kept changing; retry")

    def _still(self, grant: Grant, connection: Connection | None) -> None:
        """NotActive (or NotFound) unless `connection` is ACTIVE on `grant`'s role and ID."""
        try:
            current = self._active(grant.tenant_id, connection)
        except NotActive as exc:
            raise NotActive(
                f"the connection of tenant {grant.tenant_id!r} changed while credentials were "
                f"being issued; none are handed out: {exc}",
                subject=grant.tenant_id,
                reason=exc.reason,
                metadata=exc.metadata,
            ) from None
        if current != grant.for_run(""):
            self.forget(grant.tenant_id)
            raise GrantChanged(
                f"the connection of tenant {grant.tenant_id!r} changed while credentials were "
                "being issued; none are handed out: retry"
            )

    def _unconfirmed(self, tenant_id: str, staleness: float | None) -> StoreUnavailable:
        when = "never" if staleness is None else f"{staleness:.0f} s ago"
        return StoreUnavailable(
            f"the store cannot be reached, and this replica last confirmed the connection of "
            f"tenant {tenant_id!r} {when} (BROKER_GRANT_MAX_STALENESS is "
            f"{self.settings.grant_max_staleness:g} s): no new credentials are minted until it "
            "can be read; retry (another replica may answer)"
        )

    async def _save(
        self,
        connection: Connection,
        kind: str,
        actor: str,
        *,
        new_external_id: bool = False,
        checks: tuple[Check, ...] = (),
        role_arn: str | None = None,
    ) -> Connection:
        """Store a change with its audit event, in one transaction; then log the event.
        `role_arn`: the role the event is about, when not the connection's (a failed verify)."""
        event = audit.connection_event(connection, kind, actor, checks)
        if role_arn is not None:
            event = replace(event, role_arn=role_arn)
        try:
            saved = await self._store.save(connection, new_external_id=new_external_id, event=event)
        finally:
            self.forget(connection.tenant_id)
        audit.record(event)
        return saved

    async def events(self, tenant_id: str, limit: int) -> list[Event]:
        await self.get(tenant_id)
        return await self._store.events(tenant_id, limit)

    async def create(
        self, tenant_id: str, region: str, actor: str, admit: Callable[[], None] | None = None
    ) -> Connection:
        """A PENDING connection: the existing one (same external ID), or a new one. `admit`
        is asked once before a new one is saved (a fair-share limit: it raises to refuse)."""
        admitted = admit is None
        for _ in range(STORE_RETRIES):
            current = await self._store.get(tenant_id)
            if current is not None and current.status in (Status.ACTIVE, Status.SUSPENDED):
                raise AlreadyExists(
                    f"tenant {tenant_id!r} is already connected to {current.role_arn} "
                    f"({current.status.value}); Disconnect first to connect again"
                )
            try:
                if current is not None and current.status is Status.PENDING:
                    if not region or region == current.region:
                        return current
                    return await self._save(replace(current, region=region), "link_changed", actor)
                if not admitted and admit is not None:
                    admit()
                    admitted = True
                fresh = Connection(
                    tenant_id=tenant_id,
                    status=Status.PENDING,
                    external_id=new_external_id(),
                    region=region or self.settings.default_region,
                    created_at=datetime.now(UTC),
                    version=current.version if current else 0,
                )
                return await self._save(fresh, "created", actor, new_external_id=True)
            except StoreConflict:
                continue
        raise StoreConflict(tenant_id)

    async def disconnect(self, tenant_id: str, actor: str) -> Connection:
        for _ in range(STORE_RETRIES):
            current = await self.get(tenant_id)
            if current.status is Status.DISCONNECTED:
                return current
            try:
                saved = await self._save(
                    replace(current, status=Status.DISCONNECTED, disconnected_at=datetime.now(UTC)),
                    "disconnected",
                    actor,
                )
            except StoreConflict:
                continue
            self._on_disconnected(tenant_id)
            return saved
        raise StoreConflict(tenant_id)

    async def verify(
        self, tenant_id: str, role_arn: str, time_left: float | None, actor: str
    ) -> Connection:
        """Run every check on `role_arn`; activate the connection when all pass, else raise
        VerificationFailed with what to fix. `time_left` bounds the wait for a new role.

        The result is stored only if the connection is still as it was read before the checks
        (its version): a concurrent VerifyRole, Disconnect or CreateConnection wins, and this
        call answers Aborted rather than overwrite it with a verdict about an older state."""
        current = await self.get(tenant_id)
        if current.status is Status.DISCONNECTED:
            raise NotActive(
                f"tenant {tenant_id!r} is disconnected; CreateConnection starts over",
                subject=tenant_id,
            )
        checks = await self._run_checks(current, role_arn, time_left)
        try:
            saved = await self._save_verdict(current, role_arn, checks, actor)
        except RoleInUse:
            # Another tenant took the role while the checks ran (another replica, perhaps).
            checks = with_role_in_use(checks, role_arn)
            saved = await self._save_verdict(current, role_arn, checks, actor)
        failed = [(c.name, c.detail) for c in checks if not c.passed]
        if failed:
            raise VerificationFailed(
                f"{role_arn} failed verification: " + " ".join(d for _, d in failed),
                subject=role_arn,
                failed=failed,
            )
        if current.status in (Status.ACTIVE, Status.SUSPENDED) and current.role_arn != role_arn:
            self._on_role_changed(tenant_id)
        return saved

    async def _save_verdict(
        self, current: Connection, role_arn: str, checks: list[Check], actor: str
    ) -> Connection:
        """Store what the checks found about `role_arn`, on the version they started from. All
        passed: ACTIVE on that role. One failed on the role the connection holds: SUSPENDED
        (nothing more is issued under it). One failed on another role: the checks only."""
        passed = all(check.passed for check in checks)
        changes: dict[str, Any] = {"checks": tuple(checks)}
        if passed:
            changes |= {
                "status": Status.ACTIVE,
                "role_arn": role_arn,
                "account_id": role_arn.split(":")[4],
                "verified_at": datetime.now(UTC),
            }
        elif current.status is Status.ACTIVE and role_key(current.role_arn) == role_key(role_arn):
            changes["status"] = Status.SUSPENDED  # however the caller spelled the same role
        try:
            saved = await self._save(
                replace(current, **changes),
                "verified" if passed else "verification_failed",
                actor,
                checks=tuple(checks),
                role_arn=role_arn,  # a failed one keeps its role; the event names the one tried
            )
        except RoleInUse:
            raise
        except StoreConflict:
            raise Aborted(
                f"the connection of tenant {current.tenant_id!r} changed while VerifyRole ran "
                "(another VerifyRole, Disconnect or CreateConnection won); nothing was stored "
                "from this one: call VerifyRole again"
            ) from None
        if saved.status is Status.SUSPENDED:
            self._on_suspended(current.tenant_id)
        return saved

    async def recheck_role(self, tenant_id: str) -> Connection | None:
        """Run VerifyRole's checks again on an ACTIVE connection's role (the periodic re-check).
        Any failing now (say, the customer loosened the trust policy) suspends the connection at
        once; AWS or the store failing transiently changes nothing. Returns the suspended
        connection, else None."""
        try:
            current = await self.get(tenant_id)
            if current.status is not Status.ACTIVE:
                return None
            checks = await self._run_checks(current, current.role_arn, 0.0)
            if all(check.passed for check in checks):
                return None
            saved = await self._save_verdict(current, current.role_arn, checks, RECHECK_ACTOR)
        except (Unavailable, NotFound) as exc:  # StoreConflict is an Aborted: see below
            log.warning(
                "cannot re-check the role now",
                extra={"tenant": tenant_id, "error": type(exc).__name__},
            )
            return None
        except RoleInUse:
            # Another tenant holds the role as well (rows from before role keys existed):
            # this one cannot hold it even SUSPENDED, so it goes back to PENDING.
            return await self._unhold(current, checks)
        except Aborted:
            return None  # the connection changed meanwhile: that change's own checks stand
        log.warning(
            "the role no longer passes verification; connection suspended",
            extra={
                "tenant": tenant_id,
                "role_arn": current.role_arn,
                "failed": [c.name for c in checks if not c.passed],
            },
        )
        return saved

    async def _unhold(self, current: Connection, checks: list[Check]) -> Connection | None:
        checks = with_role_in_use(checks, current.role_arn)
        try:
            saved = await self._save(
                replace(current, status=Status.PENDING, checks=tuple(checks)),
                "verification_failed",
                RECHECK_ACTOR,
                checks=tuple(checks),
            )
        except BrokerError:  # the store failed, or the connection changed meanwhile
            return None
        log.error(
            "the role is connected to another tenant as well; this connection is PENDING",
            extra={"tenant": current.tenant_id, "role_arn": current.role_arn},
        )
        self._on_suspended(current.tenant_id)
        return saved

    async def _run_checks(
        self, connection: Connection, role_arn: str, time_left: float | None
    ) -> list[Check]:
        """VerifyRole's checks on `role_arn` for `connection`, in order (see README). A role
        another tenant holds is not probed at all."""
        account = role_arn.split(":")[4]
        checks = [Check("role_arn_format", True, f"an IAM role in account {account}")]
        holder = await self._store.role_holder(role_arn)
        if holder is not None and holder != connection.tenant_id:
            checks.append(role_in_use(role_arn))
            skipped = "not checked: the role is connected to another workspace"
            names = (WITH_ID, WITHOUT_ID_DENIED, OTHER_ID_DENIED, TRUST_POLICY)
            return checks + [Check(name, False, skipped) for name in names]
        checks.append(Check(ROLE_NOT_SHARED, True, "no other workspace is connected to it"))
        credentials: Credentials | None = None
        try:
            credentials = await self._assume_until_ready(connection, role_arn, time_left)
            checks.append(
                Check(
                    WITH_ID,
                    True,
                    f"assumed as {credentials.assumed_role_arn} for "
                    f"{self.settings.session_duration} s",
                )
            )
        except RoleNotAssumable as refused:
            checks.append(Check(WITH_ID, False, self._explain(refused, connection)))
        checks.append(await self._check_denied(role_arn, connection, None))
        checks.append(await self._check_denied(role_arn, connection, new_external_id()))
        checks.append(await self._check_trust_policy(credentials, role_arn, connection))
        return checks

    async def _assume_until_ready(
        self, connection: Connection, role_arn: str, time_left: float | None
    ) -> Credentials:
        """AssumeRole with the external ID, retried while AWS says AccessDenied for at most
        `verify_wait` seconds (a role created seconds ago may not be assumable yet)."""
        budget = self.settings.verify_wait
        if time_left is not None:
            budget = min(budget, max(time_left - 2.0, 0.0))
        give_up_at = self._clock() + budget
        delay = 1.0
        # Exactly what issuing a run's credentials sends (tags, SourceIdentity, duration), so a
        # role that passes verification also works for runs.
        grant = Grant(
            connection.tenant_id, VERIFY_SESSION_NAME, role_arn, connection.external_id, ""
        )
        request = run_request(grant, self.settings.session_duration, self.settings.policy_arns)
        while True:
            try:
                return await self._aws.assume_role(request)
            except RoleNotAssumable as refused:
                wait = min(delay, give_up_at - self._clock())
                if refused.code != "AccessDenied" or wait <= 0:
                    raise
            await self._sleep(wait)
            delay = min(delay * 2, 8.0)

    async def _check_denied(
        self, role_arn: str, connection: Connection, external_id: str | None
    ) -> Check:
        """AssumeRole without an external ID (`external_id` None), or with a fresh random one
        that belongs to nobody: AWS must deny both, or anyone who can make a deployment of the
        broker assume the role (another of our tenants, say) gets into the account."""
        probe = AssumeRoleRequest(
            role_arn=role_arn,
            session_name=VERIFY_SESSION_NAME,
            duration=VERIFY_PROBE_DURATION,
            policy_arns=session_policy_arns(self.settings.policy_arns, role_arn),
            external_id=external_id,
        )
        name = WITHOUT_ID_DENIED if external_id is None else OTHER_ID_DENIED
        try:
            await self._aws.assume_role(probe)
        except RoleNotAssumable as refused:
            if refused.code == "AccessDenied":
                return Check(name, True, "denied, as it must be")
            return Check(
                name,
                False,
                f"AWS refused the probe with {refused.code}, not AccessDenied, so it is not known "
                "whether the trust policy would deny it; verify again",
            )
        fix = (
            f'Use exactly the condition "StringEquals": {{"sts:ExternalId": '
            f'"{connection.external_id}"}} in the trust policy (the broker\'s CloudFormation '
            "template does)."
        )
        if external_id is None:
            return Check(
                name,
                False,
                "the role can be assumed WITHOUT the external ID, so anyone who can make us "
                "assume it could reach your account (the confused deputy problem). " + fix,
            )
        return Check(
            name,
            False,
            "the role can be assumed with an external ID that is not yours (a random one), so "
            "any other workspace of this platform could reach your account through us (the "
            "confused deputy problem): the trust policy accepts more than your external ID "
            "(a wildcard, StringLike, StringNotEquals, Null or IfExists condition). " + fix,
        )

    async def _check_trust_policy(
        self, credentials: Credentials | None, role_arn: str, connection: Connection
    ) -> Check:
        if credentials is None:
            return Check(TRUST_POLICY, False, "not checked: the role could not be assumed")
        try:
            document = await self._aws.read_trust_policy(credentials, role_arn)
        except RoleNotAssumable as refused:
            # The probes cannot see a policy that also trusts others ("*", another account)
            # with this very external ID: only reading it can, so an unread policy fails.
            return Check(
                TRUST_POLICY,
                False,
                f"not read: the role may not read its own trust policy (iam:GetRole: "
                f"{refused.code}), so it cannot be shown to trust only the broker. Allow the "
                "role iam:GetRole on itself (ReadOnlyAccess, which the template attaches, does).",
            )
        problem = admits_only(document, self.settings.trusted_principal_arn, connection.external_id)
        if problem:
            return Check(TRUST_POLICY, False, problem)
        return Check(
            TRUST_POLICY,
            True,
            "read back: only the broker is trusted, and only with this external ID",
        )

    def _explain(self, refused: RoleNotAssumable, connection: Connection) -> str:
        principal = self.settings.trusted_principal_arn
        if refused.code == "AccessDenied":
            return (
                f"AWS denied sts:AssumeRole to {principal} with external ID "
                f"{connection.external_id}. Check that the stack "
                f"{stack_name(connection.tenant_id, connection.external_id)} (from this "
                "connection's quick-create link) finished (CREATE_COMPLETE), that this is its "
                f"RoleArn output, and that the role's trust policy lets {principal} do "
                "sts:AssumeRole, sts:TagSession and sts:SetSourceIdentity on the condition "
                "sts:ExternalId equal to that external ID."
            )
        if "DurationSeconds" in str(refused):
            return (
                f"the role's MaxSessionDuration is below {self.settings.session_duration} s: "
                f"raise it to at least {self.settings.session_duration} (the template sets 3600)."
            )
        return f"AWS refused sts:AssumeRole: {refused}"

    def link(self, connection: Connection) -> str:
        return quick_create_url(
            template_url=self.settings.template_url,
            region=connection.region,
            tenant_id=connection.tenant_id,
            external_id=connection.external_id,
        )


def with_role_in_use(checks: list[Check], role_arn: str) -> list[Check]:
    """`checks` with the role check failed: another tenant took the role after it passed."""
    return [role_in_use(role_arn) if c.name == ROLE_NOT_SHARED else c for c in checks]


def role_in_use(role_arn: str) -> Check:
    """The failed check for a role another tenant holds (never naming that tenant)."""
    return Check(
        ROLE_NOT_SHARED,
        False,
        f"the role {role_arn} is already connected to another workspace, and a role serves one "
        "workspace only. Create a separate stack for this workspace from its own quick-create "
        "link, and verify that stack's RoleArn.",
    )


def guidance(connection: Connection, session_duration: int) -> str:
    """What the customer should do next, in words."""
    if connection.status is Status.PENDING:
        return (
            "open quick_create_url signed in to the AWS account to connect, create the stack "
            f"({stack_name(connection.tenant_id, connection.external_id)}), then call "
            "VerifyRole with the stack's RoleArn output."
        )
    if connection.status is Status.ACTIVE:
        return "connected: credentials are issued for runs."
    if connection.status is Status.SUSPENDED:
        failed = " ".join(c.detail for c in connection.checks if not c.passed)
        return (
            f"suspended: the role {connection.role_arn} no longer passes verification, so no "
            f"credentials are issued. {failed} Fix the role, then call VerifyRole with it "
            f"again. Sessions already issued stay valid until they expire (at most "
            f"{session_duration} s)."
        )
    target = f"the role {connection.role_arn}" if connection.role_arn else "the role"
    return (
        "no more credentials are issued and every stream has ended. To remove access completely, "
        "delete the CloudFormation stack "
        f"{stack_name(connection.tenant_id, connection.external_id)} ({target}). "
        f"Sessions already issued stay valid until they expire (at most {session_duration} s); "
        "to cut them off now, use 'Revoke active sessions' on the role in the IAM console."
    )
