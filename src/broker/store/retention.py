"""How many connection events a tenant keeps: the one retention rule of every store.

Applied in the transaction that stores each event with its change to the connection. Only a
save that read the version the previous one wrote can commit, so the saves of one tenant commit
one after another, each seeing every event committed before it, whichever replica wrote them:

1. **Repeats compact.** An event that repeats the tenant's newest stored event replaces it: the
   row takes the new event's time, actor and checks, counts the events it stands for
   (`repeats`) and keeps when the first of them happened (`first_at`). A `link_changed`
   repeats any `link_changed` (whoever made either: the link in effect at each audit event
   stays visible, as the last change before it). An audit event repeats one of its own kind
   with the same actor, role, external ID and check outcomes (each check's name and verdict).
2. **A bound per tenant.** At most `tenant_max_events` rows. Past it, rows go in this order:
   `link_changed` oldest first, then `verification_failed` (an audit event that changed
   nothing) oldest first, then the other audit events (an unknown kind too) oldest first; the
   newest row of each kind is never deleted. Audit rows that go are named in a
   warning (every event was logged on `broker.audit` when it was stored).

SQL here uses `?` placeholders; PostgreSQL numbers them (`numbered`).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from typing import Any

from broker.models import Event

log = logging.getLogger(__name__)

# Kinds that are not part of the audit trail: compacted whoever made them, deleted first.
# Every other kind (created, verified, verification_failed, disconnected, and any kind added
# later) is an audit event.
NOT_AUDIT = ("link_changed",)

_NOT_AUDIT_SQL = ", ".join(f"'{kind}'" for kind in NOT_AUDIT)

# The tenant's newest event, and how many it has (no row: none).
NEWEST = (
    "SELECT id, kind, actor, role_arn, external_id, checks, "
    "(SELECT count(*) FROM connection_events WHERE tenant_id = ?) "
    "FROM connection_events WHERE tenant_id = ? ORDER BY id DESC LIMIT 1"
)
# Fold a repeat into row `id` (every SET reads the row as it was).
MERGE = (
    "UPDATE connection_events SET first_at = coalesce(first_at, at), at = ?, actor = ?, "
    "role_arn = ?, checks = ?, repeats = repeats + 1 WHERE id = ?"
)
# Audit events that change nothing (a verification that failed leaves the connection as it
# was): past the bound they go before those that do, so no run of failed VerifyRole calls (no
# STS call needed: a role another tenant holds) can push a tenant's created or verified out.
UNCHANGING = ("verification_failed",)
_UNCHANGING_SQL = ", ".join(f"'{kind}'" for kind in UNCHANGING)

# A tenant's rows that may go, oldest first: those of one tier (`{side}`: the kinds in
# NOT_AUDIT, in UNCHANGING, or the others) that are not the newest of their kind.
_DELETABLE = (
    "SELECT id FROM connection_events e WHERE tenant_id = ? AND kind {side} "
    "AND EXISTS (SELECT 1 FROM connection_events n "
    "WHERE n.tenant_id = e.tenant_id AND n.kind = e.kind AND n.id > e.id) "
    "ORDER BY id LIMIT ?"
)
# Delete a tenant's rows past its bound, in retention order (`prune_values`). Each side walks
# an index from its oldest row and stops after as many rows as must go.
PRUNE = (
    "DELETE FROM connection_events WHERE id IN (SELECT id FROM ("  # noqa: S608 - constant
    f" SELECT id, 0 AS pass FROM ({_DELETABLE.format(side=f'IN ({_NOT_AUDIT_SQL})')}) AS a"
    " UNION ALL"
    f" SELECT id, 1 AS pass FROM ({_DELETABLE.format(side=f'IN ({_UNCHANGING_SQL})')}) AS b"
    " UNION ALL"
    " SELECT id, 2 AS pass FROM ("
    f"{_DELETABLE.format(side=f'NOT IN ({_NOT_AUDIT_SQL}, {_UNCHANGING_SQL})')}) AS c"
    ") AS deletable ORDER BY pass, id LIMIT ?) RETURNING kind"
)


def prune_values(tenant_id: str, excess: int) -> tuple[str | int, ...]:
    """PRUNE's values: delete `excess` rows of the tenant."""
    return (tenant_id, excess, tenant_id, excess, tenant_id, excess, excess)


# Part of a migration (never change it): it brings rows stored before retention under rule 1
# (rule 2 reaches each tenant with its next event). Runs of consecutive link_changed: the
# last one of each run counts the run and keeps when it began; the others go.
COMPACT_STORED_LINK_CHANGES = (
    """
    UPDATE connection_events SET repeats = runs.n, first_at = runs.first_at FROM (
        SELECT max(id) AS last_id, count(*) AS n, min(at) AS first_at FROM (
            SELECT id, tenant_id, kind, at, sum(CASE WHEN kind = 'link_changed'
                THEN 0 ELSE 1 END) OVER (PARTITION BY tenant_id ORDER BY id) AS run
            FROM connection_events
        ) AS numbered
        WHERE kind = 'link_changed' GROUP BY tenant_id, run HAVING count(*) > 1
    ) AS runs WHERE connection_events.id = runs.last_id
    """,
    """
    DELETE FROM connection_events WHERE id IN (
        SELECT id FROM (
            SELECT id, kind, lead(kind) OVER (PARTITION BY tenant_id ORDER BY id) AS next_kind
            FROM connection_events
        ) AS followed
        WHERE kind = 'link_changed' AND next_kind = 'link_changed'
    )
    """,
)


def repeats(newest: Any, event: Event) -> bool:
    """Whether `event` repeats `newest`, a NEWEST row (rule 1)."""
    _, kind, actor, role_arn, external_id, checks = tuple(newest)[:6]
    if kind != event.kind:
        return False
    if kind in NOT_AUDIT:
        return True
    same = (actor, role_arn, external_id) == (event.actor, event.role_arn, event.external_id)
    outcomes = [(name, bool(passed)) for name, passed, _ in json.loads(checks)]
    return same and outcomes == [(k.name, k.passed) for k in event.checks]


def pruned(tenant_id: str, kinds: list[str]) -> None:
    """Say which audit events of the tenant just went past its bound (link_changed go
    silently: they are not part of the audit trail)."""
    audit = Counter(kind for kind in kinds if kind not in NOT_AUDIT)
    if audit:
        log.warning(
            "audit events deleted past the tenant's bound (BROKER_TENANT_MAX_EVENTS); "
            "the broker.audit log holds them",
            extra={"tenant": tenant_id, "deleted": dict(sorted(audit.items()))},
        )


def numbered(sql: str) -> str:
    """`sql` with PostgreSQL's placeholders: each `?` becomes $1, $2, … in order."""
    count = iter(range(1, sql.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)
