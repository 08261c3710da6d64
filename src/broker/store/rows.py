"""A connection as a table row, the same for every store; only how times are kept differs."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from broker.models import Check, Connection, Event, Status

COLUMNS = (
    "tenant_id, status, external_id, region, role_arn, account_id, "
    "created_at, verified_at, disconnected_at, checks, version, role_key"
)
# Connections in these statuses hold their role: no other tenant's connection may hold it too
# (a unique index over `role_key` where `status` is one of them, in every store).
HOLDING = ("ACTIVE", "SUSPENDED")


def role_key(role_arn: str) -> str:
    """What makes a role one role: its partition, account and name, the name in lower case.
    IAM role names are unique per account whatever their case or path, so `role/Reader`,
    `role/reader` and `role/team/reader` in one account are one role. '' for no role."""
    parts = role_arn.split(":", 5)
    if len(parts) != 6 or not parts[5].startswith("role/"):
        return ""
    return f"{parts[1]}:{parts[4]}:{parts[5].rsplit('/', 1)[-1].lower()}"


def to_row(c: Connection, keep_time: Callable[[datetime], Any] = lambda t: t) -> tuple[Any, ...]:
    """The values for COLUMNS; `keep_time` turns a datetime into what the store keeps."""

    def kept(moment: datetime | None) -> Any:
        return None if moment is None else keep_time(moment)

    return (
        c.tenant_id,
        c.status.value,
        c.external_id,
        c.region,
        c.role_arn,
        c.account_id,
        kept(c.created_at),
        kept(c.verified_at),
        kept(c.disconnected_at),
        json.dumps([[k.name, k.passed, k.detail] for k in c.checks]),
        c.version,
        role_key(c.role_arn),
    )


def from_row(
    row: tuple[Any, ...] | Any, read_time: Callable[[Any], datetime] = lambda t: t
) -> Connection:
    """The connection in a row of COLUMNS; `read_time` turns a kept time back into a datetime."""

    def read(value: Any) -> datetime | None:
        return None if value is None else read_time(value)

    created_at = read(row[6])
    if created_at is None:
        raise ValueError(f"connection {row[0]!r} has no created_at")
    return Connection(
        tenant_id=row[0],
        status=Status(row[1]),
        external_id=row[2],
        region=row[3],
        role_arn=row[4],
        account_id=row[5],
        created_at=created_at,
        verified_at=read(row[7]),
        disconnected_at=read(row[8]),
        checks=tuple(Check(name, bool(ok), detail) for name, ok, detail in json.loads(row[9])),
        version=row[10],
    )


EVENT_COLUMNS = "tenant_id, kind, at, actor, role_arn, external_id, checks"


def event_row(e: Event, keep_time: Callable[[datetime], Any] = lambda t: t) -> tuple[Any, ...]:
    return (
        e.tenant_id,
        e.kind,
        keep_time(e.at),
        e.actor,
        e.role_arn,
        e.external_id,
        json.dumps([[k.name, k.passed, k.detail] for k in e.checks]),
    )


def event_from_row(row: Any, read_time: Callable[[Any], datetime] = lambda t: t) -> Event:
    return Event(
        tenant_id=row[0],
        kind=row[1],
        at=read_time(row[2]),
        actor=row[3],
        role_arn=row[4],
        external_id=row[5],
        checks=tuple(Check(name, bool(ok), detail) for name, ok, detail in json.loads(row[6])),
    )
