"""Closed loops of IssueCredentials against a broker, for the rows that measure what a cached
call costs while something happens behind it (bench/waits.py, bench/regions.py): each call's
latency and the credentials it got, and when the broker's refresh points fall for credentials
just issued."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc

from bench.report import Figure
from broker.cache import refresh_points
from broker.models import Credentials
from broker.v1 import broker_pb2 as pb

CALL_TIMEOUT = 30.0  # each measured call's deadline


@dataclass
class Calls:
    """What a closed loop of IssueCredentials measured: each answer's latency (s), run and
    access key id, and the failures by status code."""

    answers: list[tuple[float, str, str]] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)

    def latencies(self, runs: Collection[str] | None = None) -> list[float]:
        """Sorted latencies; with `runs`, of the answers for those runs."""
        return sorted(latency for latency, run, _ in self.answers if runs is None or run in runs)

    def renewed(self, keys: Mapping[str, str]) -> int:
        """Answers for the runs of `keys` (run → access key id) with other keys than those."""
        return sum(run in keys and key != keys[run] for _, run, key in self.answers)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


@dataclass
class Issued:
    """Runs' first credentials: each run's access key id, and the refresh points the broker
    computes for them, bounded by when the call was sent and answered (the broker stamps
    `issued_at` in between): the advisory window surely starts by `advisory[1]`, the mandatory
    one surely not before `mandatory[0]`."""

    keys: dict[str, str]
    expiry: float  # the earliest expiry (epoch seconds)
    advisory: tuple[float, float]  # earliest and latest advisory point of all the runs
    mandatory: tuple[float, float]
    lifetime: float  # the shortest lifetime

    def stale_floor(self) -> float:
        """The broker's stale-while-error floor (cache.CredentialCache._stale): credentials
        with less than this left are not served stale."""
        return min(5.0, self.lifetime / 10)


def p99(latencies: Sequence[float]) -> float:
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]


async def sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.time()))


async def load(
    stubs: Sequence[Any], requests: Sequence[pb.IssueCredentialsRequest], workers: int, end: float
) -> Calls:
    """`workers` callers, each asking IssueCredentials for the runs in turn, until `end`."""
    calls = Calls()

    async def worker(index: int) -> None:
        turn = index
        while time.time() < end:
            request = requests[turn % len(requests)]
            turn += workers
            started = time.perf_counter()
            try:
                answer = await stubs[index % len(stubs)].IssueCredentials(
                    request, timeout=CALL_TIMEOUT
                )
            except grpc.aio.AioRpcError as error:
                calls.failures[error.code().name] += 1
                continue
            calls.answers.append(
                (time.perf_counter() - started, request.run_id, answer.credentials.access_key_id)
            )

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return calls


def requests_for(tenant: str, prefix: str, runs: int) -> list[pb.IssueCredentialsRequest]:
    return [
        pb.IssueCredentialsRequest(tenant_id=tenant, run_id=f"{prefix}-{i}") for i in range(runs)
    ]


async def issue(
    stub: Any, requests: Sequence[pb.IssueCredentialsRequest], margin: float, mandatory: float
) -> Issued:
    """The runs' first credentials, asked at once just after a whole second (the stand-in's
    expiry has whole seconds: all the runs then expire in the same one), and their refresh
    points on a broker with BROKER_REFRESH_MARGIN `margin` and BROKER_REFRESH_MANDATORY
    `mandatory`."""
    await sleep_until(int(time.time()) + 1.02)
    sent = time.time()
    answers = await asyncio.gather(*(stub.IssueCredentials(r) for r in requests))
    answered = time.time()
    keys, expiries = {}, []
    for request, answer in zip(requests, answers, strict=True):
        keys[request.run_id] = answer.credentials.access_key_id
        expiries.append(answer.credentials.expiration.ToDatetime(tzinfo=UTC))

    def points(issued: float, expires: datetime) -> tuple[float, float]:
        credentials = Credentials("", "", "", expires, "", datetime.fromtimestamp(issued, UTC))
        return refresh_points(credentials, margin, mandatory)

    early = [points(sent, e) for e in expiries]
    late = [points(answered, e) for e in expiries]
    expiry = min(e.timestamp() for e in expiries)
    return Issued(
        keys,
        expiry,
        (min(a for a, _ in early), max(a for a, _ in late)),
        (min(m for _, m in early), max(m for _, m in late)),
        expiry - answered,
    )


async def renewed(
    stub: Any, requests: Sequence[pb.IssueCredentialsRequest], old: dict[str, str], deadline: float
) -> bool:
    """Whether every run is served credentials other than `old` before `deadline`."""
    waiting = list(requests)
    while waiting and time.time() < deadline:
        answers = await asyncio.gather(*(stub.IssueCredentials(r) for r in waiting))
        waiting = [
            r
            for r, a in zip(waiting, answers, strict=True)
            if a.credentials.access_key_id == old[r.run_id]
        ]
        await asyncio.sleep(0.05)
    return not waiting


def ms(seconds: float) -> float:
    return seconds * 1000


def none(section: str, what: str, calls: float, note: str = "") -> Figure:
    """A count of calls whose target is none."""
    return Figure(section, what, calls, "calls", target="= 0", met=calls == 0, note=note)


async def miss(stub: Any, tenant: str, run: str, calls: Calls) -> None:
    """One IssueCredentials for a new run, its latency (or failure) added to `calls`."""
    request = pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run)
    started = time.perf_counter()
    try:
        answer = await stub.IssueCredentials(request, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        calls.failures[error.code().name] += 1
        return
    calls.answers.append((time.perf_counter() - started, run, answer.credentials.access_key_id))
