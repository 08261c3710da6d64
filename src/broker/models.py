"""The broker's value types. None of them is a protobuf message; service.py converts at the edge."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple


class Status(enum.Enum):
    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    DISCONNECTED = "DISCONNECTED"
    # Was ACTIVE; a re-check found the role no longer admits only us, with only this ID.
    SUSPENDED = "SUSPENDED"


@dataclass(frozen=True)
class Check:
    """One VerifyRole check: its stable name, the outcome, and what to fix when it failed."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Connection:
    """A tenant's link to one IAM role. Holds no secret: the external ID is not one (AWS says so).

    `version` grows by one with every stored change; the store uses it to refuse lost updates.
    """

    tenant_id: str
    status: Status
    external_id: str
    region: str
    created_at: datetime
    role_arn: str = ""
    account_id: str = ""
    verified_at: datetime | None = None
    disconnected_at: datetime | None = None
    checks: tuple[Check, ...] = ()
    version: int = 0


class Grant(NamedTuple):
    """What one run may be issued: the tenant's active role, as of the moment it was read.

    A cached credential is served only for an equal grant, so a disconnect, a reconnect (new
    external ID) or a role change never serves a credential of the old role. A named tuple:
    one is made and compared on every IssueCredentials.
    """

    tenant_id: str
    run_id: str
    role_arn: str
    external_id: str
    region: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant_id, self.run_id)

    def for_run(self, run_id: str) -> Grant:
        """The same grant, for another run of the tenant. Made directly: on the hot path, and
        namedtuple's `_replace` costs twice as much."""
        return Grant(self.tenant_id, run_id, self.role_arn, self.external_id, self.region)


@dataclass(frozen=True)
class Credentials:
    """Temporary AWS credentials. Lives in memory only; `repr` never shows the secrets."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime
    assumed_role_arn: str
    issued_at: datetime
    # Messages made from these credentials, kept by the code that sends them under its own
    # key: the same credentials are sent many times. Not part of equality.
    encoded: dict[object, object] = field(default_factory=dict, compare=False, repr=False)

    @property
    def lifetime(self) -> float:
        return (self.expiration - self.issued_at).total_seconds()


@dataclass(frozen=True)
class Event:
    """One change to a connection, for the audit trail: stored with the change itself."""

    tenant_id: str
    kind: str  # created, link_changed, verified, verification_failed, disconnected
    at: datetime
    actor: str
    role_arn: str = ""
    external_id: str = ""
    checks: tuple[Check, ...] = ()
