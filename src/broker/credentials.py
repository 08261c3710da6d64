"""The one seam between handlers and AWS: `CredentialSource`, "credentials for this grant".

`StsSource` mints them with sts:AssumeRole; `cache.CredentialCache` wraps any source and
implements the same protocol, so handlers never know which they hold.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Protocol

from broker import audit
from broker.auth import CALLER
from broker.aws import AssumeRoleRequest, AwsClient
from broker.errors import RoleNotAssumable
from broker.models import Credentials, Grant

SESSION_NAME_MAX = 64
_NOT_IN_SESSION_NAME = re.compile(r"[^A-Za-z0-9+=,.@_-]")


class CredentialSource(Protocol):
    async def get(self, grant: Grant) -> Credentials:
        """Credentials for `grant` with more than the refresh margin left."""
        ...


def session_name(run_id: str) -> str:
    """RoleSessionName (and SourceIdentity) for a run: the run id, made valid (2-64 of
    [A-Za-z0-9+=,.@_-]). An id that had to change gets a digest suffix so names stay unique."""
    name = _NOT_IN_SESSION_NAME.sub("-", run_id)
    if name == run_id and 2 <= len(name) <= SESSION_NAME_MAX:
        return name
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:10]
    return f"{name[: SESSION_NAME_MAX - 11]}-{digest}"


def partition_of(arn: str) -> str:
    return arn.split(":", 2)[1]


def session_policy_arns(configured: Sequence[str], role_arn: str) -> list[str]:
    """The managed policies that bound every session: ReadOnlyAccess in the role's partition,
    unless others are configured."""
    if configured:
        return list(configured)
    return [f"arn:{partition_of(role_arn)}:iam::aws:policy/ReadOnlyAccess"]


class StsSource:
    """Mints a run's own STS session: named after the run, tagged, read-only, time-bounded."""

    def __init__(self, aws: AwsClient, *, duration: int, policy_arns: Sequence[str]) -> None:
        self._aws = aws
        self._duration = duration
        self._policy_arns = tuple(policy_arns)

    async def get(self, grant: Grant) -> Credentials:
        request = run_request(grant, self._duration, self._policy_arns)
        try:
            credentials = await self._aws.assume_role(request)
        except RoleNotAssumable as refused:
            raise RoleNotAssumable(
                f"the role {grant.role_arn} of tenant {grant.tenant_id!r} can no longer be "
                f"assumed ({refused}); the customer must restore the role's trust policy (or "
                "connect again), then call VerifyRole",
                subject=grant.role_arn,
                code=refused.code,
            ) from refused
        audit.issued(grant, credentials, request.session_name, CALLER.get().identity)
        return credentials


class GrantKeeper(Protocol):
    """What ConfirmedSource asks of the connection lifecycle (Connections)."""

    def generation(self, tenant_id: str) -> int: ...

    async def ensure_fresh(self, grant: Grant) -> None: ...

    async def confirm(self, grant: Grant, generation: int) -> None: ...


class ConfirmedSource:
    """Wraps a source so that every session it mints stands on a confirmed grant: before
    AssumeRole, the grant must have been confirmed by the store within the staleness bound
    (`ensure_fresh`); after it, the store is read again (`confirm`), so a Disconnect or role
    change committed while STS was answering wins, on any replica."""

    def __init__(self, source: CredentialSource, keeper: GrantKeeper) -> None:
        self._source = source
        self._keeper = keeper

    async def get(self, grant: Grant) -> Credentials:
        generation = self._keeper.generation(grant.tenant_id)
        await self._keeper.ensure_fresh(grant)
        credentials = await self._source.get(grant)
        await self._keeper.confirm(grant, generation)
        return credentials


def run_request(grant: Grant, duration: int, policy_arns: Sequence[str]) -> AssumeRoleRequest:
    """The AssumeRole a run's credentials come from: named after the run (RoleSessionName,
    SourceIdentity, session tags), bounded by the session policy, with the external ID."""
    name = session_name(grant.run_id)
    return AssumeRoleRequest(
        role_arn=grant.role_arn,
        session_name=name,
        duration=duration,
        policy_arns=session_policy_arns(policy_arns, grant.role_arn),
        external_id=grant.external_id,
        source_identity=name,
        tags={"tenant": grant.tenant_id, "run": grant.run_id},
    )
