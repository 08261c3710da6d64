"""The audit trail. Connection changes are stored with the change (ListConnectionEvents reads
them back) and logged; every issuance of new credentials is logged. Each line is on the
`broker.audit` logger with `audit=<kind>`, and holds no secret: an access key id is not one,
and it is what lets the customer find a run's calls in CloudTrail."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from broker.models import Check, Connection, Credentials, Event, Grant

log = logging.getLogger("broker.audit")


def connection_event(
    connection: Connection, kind: str, actor: str, checks: tuple[Check, ...] = ()
) -> Event:
    """The event for a change to `connection` (as it is after the change)."""
    return Event(
        tenant_id=connection.tenant_id,
        kind=kind,
        at=datetime.now(UTC),
        actor=actor,
        role_arn=connection.role_arn,
        external_id=connection.external_id,
        checks=checks,
    )


def record(event: Event) -> None:
    """Log a connection event that was just stored."""
    log.info(
        "connection %s",
        event.kind,
        extra={
            "audit": event.kind,
            "tenant": event.tenant_id,
            "actor": event.actor,
            "role_arn": event.role_arn,
            "external_id": event.external_id,
            "checks": {c.name: c.passed for c in event.checks} or None,
        },
    )


def issued(grant: Grant, credentials: Credentials, session_name: str, actor: str) -> None:
    """Log new credentials minted for a run."""
    log.info(
        "credentials issued",
        extra={
            "audit": "credentials_issued",
            "tenant": grant.tenant_id,
            "run": grant.run_id,
            "role_arn": grant.role_arn,
            "assumed_role_arn": credentials.assumed_role_arn,
            "access_key_id": credentials.access_key_id,
            "source_identity": session_name,
            "expiration": credentials.expiration.isoformat(),
            "actor": actor,
        },
    )
