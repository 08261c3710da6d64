"""The reliability report: each scenario in tests/test_reliability.py adds one row; the run
prints the table (and `make reliability` writes it to docs/reliability.md)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    scenario: str
    faults: str = ""
    requests: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    credentials_lost: int = 0  # calls for runs with valid cached credentials that got none
    streams_dropped: int = 0  # streams that ended while their credentials were valid
    notes: str = ""

    def failed(self, code: str) -> None:
        self.failures[code] += 1


ROWS: list[Row] = []


def record(row: Row) -> None:
    """Add the scenario's row to the report, then hold it to what every scenario must show: no
    credentials lost, no stream dropped while its credentials were valid."""
    ROWS.append(row)
    assert row.credentials_lost == 0, row
    assert row.streams_dropped == 0, row


def table() -> str:
    lines = [
        "| scenario | faults injected | requests | failures by code | credentials lost "
        "| streams dropped | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        failures = ", ".join(f"{code} {n}" for code, n in sorted(row.failures.items())) or "none"
        lines.append(
            f"| {row.scenario} | {row.faults} | {row.requests} | {failures} | "
            f"{row.credentials_lost} | {row.streams_dropped} | {row.notes} |"
        )
    return "\n".join(lines)


def write_if_asked() -> None:
    """With BROKER_RELIABILITY_REPORT=PATH (set by `make reliability`), keep the table there."""
    target = os.environ.get("BROKER_RELIABILITY_REPORT")
    if target and ROWS:
        text = Path(target).read_text() if Path(target).exists() else ""
        head = text.split("<!-- table -->")[0].rstrip() or "# Reliability"
        Path(target).write_text(f"{head}\n\n<!-- table -->\n{table()}\n")
