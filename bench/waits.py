"""Nobody waits on STS (#14): cached IssueCredentials at and after the refresh point while the
background renewal is under way; during an STS outage (errors, or a hang); and new runs while
one of two STS regions is down. Against the STS stand-in, whose credentials' lifetime and
answers are set while it runs (bench/fakests.py)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc

from bench.fakests import DEFAULT_LATENCY, FakeSts
from bench.report import Figure, Report
from bench.world import RunningBroker, World, stub_for, warm_up
from broker.cache import refresh_points
from broker.config import BOTOCORE_MANDATORY_REFRESH, DEFAULT_REFRESH_MARGIN
from broker.models import Credentials
from broker.v1 import broker_pb2 as pb

REFRESH = "Nobody waits on STS: the refresh point"
OUTAGE = "Nobody waits on STS: an STS outage"
REGION = "Nobody waits on STS: one STS region down"
# The broker's default windows (for 3600 s sessions), set explicitly: for the stand-in's
# short lifetimes the broker uses at most half the lifetime as the advisory lead, and at most
# half that as the mandatory one (cache.refresh_points).
MARGIN, MANDATORY = DEFAULT_REFRESH_MARGIN, BOTOCORE_MANDATORY_REFRESH
HANG = 600.0  # seconds the stand-in takes to answer in a hang: past every timeout of the broker
CALL_TIMEOUT = 30.0  # each measured call's deadline
MISSES = "broker_cache_misses_total"  # calls that went to STS (or joined a call under way)
RENEWALS = "broker_cache_background_renewals_total"
STALE = "broker_cache_stale_served_total"


@dataclass
class Calls:
    """What a closed loop of IssueCredentials measured: each answer's latency (s), run and
    access key id, and the failures by status code."""

    answers: list[tuple[float, str, str]] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)

    def latencies(self, keys: dict[str, str] | None = None) -> list[float]:
        """Sorted latencies; with `keys` (run → access key id), of answers with those keys."""
        return sorted(
            latency for latency, run, key in self.answers if keys is None or keys.get(run) == key
        )

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


def _p99(latencies: Sequence[float]) -> float:
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]


async def _sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.time()))


async def _load(
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


def _requests(tenant: str, prefix: str, runs: int) -> list[pb.IssueCredentialsRequest]:
    return [
        pb.IssueCredentialsRequest(tenant_id=tenant, run_id=f"{prefix}-{i}") for i in range(runs)
    ]


async def _issue(stub: Any, requests: Sequence[pb.IssueCredentialsRequest]) -> Issued:
    """The runs' first credentials, asked at once just after a whole second (the stand-in's
    expiry has whole seconds: all the runs then expire in the same one)."""
    await _sleep_until(int(time.time()) + 1.02)
    sent = time.time()
    answers = await asyncio.gather(*(stub.IssueCredentials(r) for r in requests))
    answered = time.time()
    keys, expiries = {}, []
    for request, answer in zip(requests, answers, strict=True):
        keys[request.run_id] = answer.credentials.access_key_id
        expiries.append(answer.credentials.expiration.ToDatetime(tzinfo=UTC))

    def points(issued: float, expires: datetime) -> tuple[float, float]:
        credentials = Credentials("", "", "", expires, "", datetime.fromtimestamp(issued, UTC))
        return refresh_points(credentials, MARGIN, MANDATORY)

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


async def _renewed(
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


def _ms(seconds: float) -> float:
    return seconds * 1000


def _latency_rows(
    report: Report, section: str, label: str, during: Sequence[float], before: Sequence[float]
) -> None:
    """p50, p99 (target: at most 1.2 times the baseline's) and the slowest call of `during` beside
    `before`'s."""
    baseline = "cached, before the advisory point"
    p50, base50 = _ms(statistics.median(during)), _ms(statistics.median(before))
    report.add(Figure(section, f"{label}: p50", p50, "ms", base50, baseline))
    p99, base99 = _ms(_p99(during)), _ms(_p99(before))
    report.add(
        Figure(section, f"{label}: p99", p99, "ms", base99, baseline, "≤ 1.2×", p99 <= 1.2 * base99)
    )
    report.add(
        Figure(
            section,
            f"{label}: slowest call",
            _ms(during[-1]),
            "ms",
            _ms(before[-1]),
            baseline,
            note=f"of {len(during):,} calls; the baseline of {len(before):,}",
        )
    )


def _none(section: str, what: str, calls: float, note: str = "") -> Figure:
    """A count of calls whose target is none."""
    return Figure(section, what, calls, "calls", target="= 0", met=calls == 0, note=note)


async def run(world: World, report: Report, *, quick: bool) -> None:
    tenant = "waits"
    store = await world.verified_store(tenant, [tenant])
    with (
        world.fake_sts(f"{tenant}-sts") as sts,
        world.broker_on(
            sts, tenant, store, refresh_margin=MARGIN, refresh_mandatory=MANDATORY
        ) as broker,
    ):
        async with stub_for(broker.target) as stubs:
            await warm_up(stubs[0], sts, tenant)
            await _refresh_point(report, broker, sts, stubs, tenant, quick=quick)
            await _outage_errors(report, broker, sts, stubs, tenant, quick=quick)
            await _outage_hang(report, broker, sts, stubs, tenant, quick=quick)
    await _region_down(world, report, quick=quick)


async def _refresh_point(
    report: Report,
    broker: RunningBroker,
    sts: FakeSts,
    stubs: Sequence[Any],
    tenant: str,
    *,
    quick: bool,
) -> None:
    lifetime, slow, window = (8, 1.2, 1.0) if quick else (16, 2.5, 2.0)
    runs, workers = (2, 4) if quick else (4, 8)
    report.note(
        REFRESH,
        f"{runs} runs of one tenant, asked for by {workers} callers in a closed loop (each "
        "asks the runs in turn, over one connection from the benchmark's process). The STS "
        f"stand-in issues credentials that live {lifetime} s; with BROKER_REFRESH_MARGIN="
        f"{MARGIN} and BROKER_REFRESH_MANDATORY={MANDATORY} (the defaults) the broker scales "
        "its windows to so short a lifetime: the advisory point half-way through it, the "
        "mandatory point half-way from there to expiry. Baseline: the same calls for "
        f"{window:g} s ending 0.5 s before the advisory point. Just before it the stand-in is "
        f"made to answer AssumeRole after {slow:g} s, so the background renewal that the "
        f"first call past the point starts is still in flight while the calls are measured "
        f"for {window:g} s from the point (every one answered with the credentials being "
        "renewed: none arrived meanwhile). Calls that went to STS: the broker's "
        "broker_cache_misses over the window (a caller that waited on the renewal is one).",
    )
    sts.configure(latency=DEFAULT_LATENCY, lifetime=lifetime, error=None)
    requests = _requests(tenant, "refresh", runs)
    issued = await _issue(stubs[0], requests)
    end = issued.advisory[0] - 0.5
    await _sleep_until(end - window)
    before = await _load(stubs, requests, workers, end)
    sts.configure(latency=slow)
    sts.reset()
    misses, renewals = broker.counter(MISSES), broker.counter(RENEWALS)
    start = issued.advisory[1] + 0.02
    await _sleep_until(start)
    during = await _load(stubs, requests, workers, min(start + window, issued.mandatory[0]))
    misses, renewals = broker.counter(MISSES) - misses, broker.counter(RENEWALS) - renewals
    renewed = await _renewed(stubs[0], requests, issued.keys, issued.expiry)
    stats = sts.stats()
    sts.configure(latency=DEFAULT_LATENCY, lifetime=None)
    old = during.latencies(issued.keys)
    if not renewed or len(old) != len(during.answers) or during.failed or before.failed:
        raise RuntimeError(
            f"refresh point: renewed {renewed}, {len(old)} of {len(during.answers)} calls "
            f"answered with the old credentials, failures {before.failures + during.failures}"
        )
    label = "cached call while the renewal is in flight"
    _latency_rows(report, REFRESH, label, old, before.latencies())
    report.add(_none(REFRESH, f"{label}: calls that went to STS", misses))
    report.add(
        Figure(
            REFRESH,
            "background renewals started",
            renewals,
            "renewals",
            runs,
            "one per run",
            "= 1×",
            renewals == runs,
        )
    )
    report.add(
        Figure(
            REFRESH,
            "AssumeRole calls for the renewal",
            stats["AssumeRole"],
            "calls",
            runs,
            "one per run",
            "= 1×",
            stats["AssumeRole"] == runs,
        )
    )


async def _outage_errors(
    report: Report,
    broker: RunningBroker,
    sts: FakeSts,
    stubs: Sequence[Any],
    tenant: str,
    *,
    quick: bool,
) -> None:
    lifetime, window = (12, 1.0) if quick else (24, 2.0)
    runs, workers = (2, 4) if quick else (4, 8)
    error = "ServiceUnavailable"
    sts.configure(latency=DEFAULT_LATENCY, lifetime=lifetime, error=None)
    requests = _requests(tenant, "errors", runs)
    issued = await _issue(stubs[0], requests)
    end = issued.advisory[0] - 0.5
    await _sleep_until(end - window)
    before = await _load(stubs, requests, workers, end)
    sts.configure(error=error)
    sts.reset()
    misses = broker.counter(MISSES)
    await _sleep_until(issued.advisory[1] + 0.02)
    advisory = await _load(stubs, requests, workers, issued.mandatory[0] - 0.05)
    misses = broker.counter(MISSES) - misses
    errors = sts.stats()["errors"]
    misses_late, stale = broker.counter(MISSES), broker.counter(STALE)
    await _sleep_until(issued.mandatory[1] + 0.02)
    floor = issued.stale_floor()
    mandatory = await _load(stubs, requests, workers, issued.expiry - floor - 0.3)
    misses_late = broker.counter(MISSES) - misses_late
    stale = broker.counter(STALE) - stale
    sts.configure(error=None, lifetime=None)
    if before.failed:
        raise RuntimeError(f"outage: calls failed before it: {before.failures}")
    report.note(
        OUTAGE,
        f"{runs} runs of one tenant, {workers} callers in a closed loop as in the refresh "
        f"point's rows, on the same broker. Errors: credentials living {lifetime} s; baseline "
        f"as there; from just before the advisory point every AssumeRole gets {error} (HTTP "
        "503), and the calls are measured from the advisory point to the mandatory one (the "
        "broker renews in the background, and backs off after each failure), then from the "
        f"mandatory point until {floor + 0.3:.1f} s before expiry (the broker serves valid "
        f"credentials stale while renewal fails, but not in their last {floor:.1f} s). There "
        "a call that finds no renewal backing off waits for one (botocore's 3 attempts with "
        "backoff, one region: up to about 3 s), and the calls behind it are answered stale "
        "until the back-off ends; a call whose wait ends inside the last "
        f"{floor:.1f} s gets UNAVAILABLE (informative rows: the credentials are about to "
        "expire anyway). Calls that went to STS: broker_cache_misses over the window (each "
        "caller that waited on a renewal is one).",
    )
    label = f"{error}, advisory window"
    if not advisory.answers:
        raise RuntimeError(f"outage: no call answered in the advisory window: {advisory.failures}")
    _latency_rows(report, OUTAGE, label, advisory.latencies(), before.latencies())
    report.add(_none(OUTAGE, f"{label}: calls failed", advisory.failed))
    report.add(
        _none(
            OUTAGE,
            f"{label}: calls that went to STS",
            misses,
            f"the stand-in answered {errors:.0f} AssumeRole with {error} meanwhile "
            "(background renewals)",
        )
    )
    label = f"{error}, mandatory window"
    late = mandatory.latencies()
    base = _ms(statistics.median(before.latencies()))
    if late:
        report.add(
            Figure(
                OUTAGE,
                f"{label}: p50",
                _ms(statistics.median(late)),
                "ms",
                base,
                "cached, before the advisory point",
            )
        )
        report.add(
            Figure(
                OUTAGE,
                f"{label}: slowest call (one that waited for an STS attempt)",
                _ms(late[-1]),
                "ms",
                base,
                "cached, before the advisory point",
                note=f"of {len(late):,} calls",
            )
        )
    report.add(
        Figure(
            OUTAGE,
            f"{label}: calls that waited on STS",
            misses_late,
            "calls",
            note=f"of {len(late) + mandatory.failed:,}; {stale:.0f} answered stale",
        )
    )
    report.add(
        Figure(
            OUTAGE,
            f"{label}: calls failed",
            mandatory.failed,
            "calls",
            note=", ".join(f"{code} {n}" for code, n in mandatory.failures.most_common()),
        )
    )


async def _outage_hang(
    report: Report,
    broker: RunningBroker,
    sts: FakeSts,
    stubs: Sequence[Any],
    tenant: str,
    *,
    quick: bool,
) -> None:
    lifetime, window = (8, 1.0) if quick else (16, 2.0)
    runs, workers = (2, 4) if quick else (4, 8)
    sts.configure(latency=DEFAULT_LATENCY, lifetime=lifetime, error=None)
    requests = _requests(tenant, "hang", runs)
    issued = await _issue(stubs[0], requests)
    end = issued.advisory[0] - 0.5
    await _sleep_until(end - window)
    before = await _load(stubs, requests, workers, end)
    sts.configure(latency=HANG)
    sts.reset()
    misses = broker.counter(MISSES)
    await _sleep_until(issued.advisory[1] + 0.02)
    advisory = await _load(stubs, requests, workers, issued.mandatory[0] - 0.05)
    misses = broker.counter(MISSES) - misses
    hanging = sts.stats()["in_flight"]
    sts.configure(latency=DEFAULT_LATENCY, lifetime=None)
    if before.failed or not advisory.answers:
        raise RuntimeError(f"hang: failures {before.failures + advisory.failures}")
    report.note(
        OUTAGE,
        f"Hang: credentials living {lifetime} s; from just before the advisory point the "
        "stand-in holds every AssumeRole unanswered (as an endpoint that accepts connections "
        "and never answers), and the calls are measured from the advisory point to the "
        "mandatory one. A call in the mandatory window would join the hung renewal and wait "
        "for its timeouts (botocore's 5 s read timeout, 3 attempts, one region): not measured "
        "here, as that exceeds the whole mandatory window of so short a lifetime.",
    )
    label = "hanging, advisory window"
    _latency_rows(report, OUTAGE, label, advisory.latencies(), before.latencies())
    report.add(_none(OUTAGE, f"{label}: calls failed", advisory.failed))
    report.add(_none(OUTAGE, f"{label}: calls that went to STS", misses))
    report.add(
        Figure(
            OUTAGE,
            f"{label}: renewals left hanging at the stand-in",
            hanging,
            "calls",
            runs,
            "one per run",
            note="AssumeRole unanswered at the window's end: the renewals did hang",
        )
    )


async def _miss(stub: Any, tenant: str, run: str, calls: Calls) -> None:
    """One IssueCredentials for a new run, its latency (or failure) added to `calls`."""
    request = pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run)
    started = time.perf_counter()
    try:
        answer = await stub.IssueCredentials(request, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        calls.failures[error.code().name] += 1
        return
    calls.answers.append((time.perf_counter() - started, run, answer.credentials.access_key_id))


async def _region_down(world: World, report: Report, *, quick: bool) -> None:
    n = 10 if quick else 40
    tenant, first_region, second_region = "regions", "us-east-1", "us-west-2"
    store = await world.verified_store(tenant, [tenant])
    with (
        world.fake_sts(f"{tenant}-{first_region}") as first,
        world.fake_sts(f"{tenant}-{second_region}") as second,
        world.broker_on({first_region: first, second_region: second}, tenant, store) as broker,
    ):
        async with stub_for(broker.target) as (stub,):
            await warm_up(stub, first, tenant)
            second.reset()
            up = Calls()
            for i in range(n):
                await _miss(stub, tenant, f"up-{i}", up)
            first.kill()
            down = Calls()
            for i in range(n + 1):
                await _miss(stub, tenant, f"down-{i}", down)
            failovers = broker.counter("broker_sts_failovers_total", region=first_region)
            stats = second.stats()
    if up.failed:
        raise RuntimeError(f"both regions up: calls failed: {up.failures}")
    report.note(
        REGION,
        f"A broker with BROKER_STS_REGIONS={first_region},{second_region}, each region's "
        "endpoint (BROKER_STS_ENDPOINT_URLS) an STS stand-in of its own "
        f"({DEFAULT_LATENCY * 1000:.0f} ms), the circuit breaker's cooldown the default. "
        f"{n} new runs one after another with both regions up (all go to {first_region}); then "
        f"{first_region}'s stand-in is killed (connections refused, as an unreachable "
        f"endpoint) and {n + 1} new runs follow one after another: the first pays the "
        f"failover (botocore's 2 attempts in {first_region} with its backoff between them, "
        f"then {second_region}), the others find the breaker open and go to {second_region} "
        "straight away. Calls moved on: the broker's broker_sts_failovers.",
    )
    baseline = "a new run, both regions up"
    base_p50, base_p99 = statistics.median(up.latencies()), _p99(up.latencies())
    paid = [latency for latency, run, _ in down.answers if run == "down-0"]
    if paid:
        report.add(
            Figure(
                REGION,
                f"first new run after {first_region} went down (pays the failover)",
                _ms(paid[0]),
                "ms",
                _ms(base_p50),
                baseline,
                note=f"adds {_ms(paid[0] - base_p50):.0f} ms",
            )
        )
    after = sorted(latency for latency, run, _ in down.answers if run != "down-0")
    if after:
        p50, p99 = statistics.median(after), _p99(after)
        report.add(
            Figure(
                REGION,
                "new runs once the breaker is open: median",
                _ms(p50),
                "ms",
                _ms(base_p50),
                baseline,
                note=f"adds {_ms(p50 - base_p50):.2f} ms",
            )
        )
        report.add(
            Figure(
                REGION,
                "new runs once the breaker is open: p99",
                _ms(p99),
                "ms",
                _ms(base_p99),
                baseline,
                note=f"adds {_ms(p99 - base_p99):.2f} ms",
            )
        )
    report.add(
        _none(
            REGION,
            f"new runs failed with {first_region} down",
            down.failed,
            ", ".join(f"{code} {k}" for code, k in down.failures.most_common()),
        )
    )
    report.add(
        Figure(
            REGION,
            f"calls moved on from {first_region} (failovers)",
            failovers,
            "calls",
            1,
            "the first call alone",
            "= 1×",
            failovers == 1,
        )
    )
    report.add(
        Figure(
            REGION,
            f"AssumeRole answered by {second_region}",
            stats["AssumeRole"],
            "calls",
            n + 1,
            "one per run",
            "= 1×",
            stats["AssumeRole"] == n + 1,
        )
    )
