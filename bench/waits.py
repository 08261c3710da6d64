"""Nobody waits on STS (#14): cached IssueCredentials at and after the refresh point while the
background renewal is under way; during an STS outage (errors, or a hang); and new runs while
one of two STS regions is down. Against the STS stand-in, whose credentials' lifetime and
answers are set while it runs (bench/fakests.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median
from typing import Any

from bench import regions
from bench.calls import (
    Calls,
    Issued,
    issue,
    load,
    ms,
    none,
    p99,
    renewed,
    requests_for,
    sleep_until,
)
from bench.fakests import DEFAULT_LATENCY, FakeSts
from bench.report import Figure, Report
from bench.world import RunningBroker, World, stub_for, warm_up
from broker.config import BOTOCORE_MANDATORY_REFRESH, DEFAULT_REFRESH_MARGIN
from broker.v1 import broker_pb2 as pb

REFRESH = "Nobody waits on STS: the refresh point"
OUTAGE = "Nobody waits on STS: an STS outage"
# The broker's default windows (for 3600 s sessions), set explicitly: for the stand-in's
# short lifetimes the broker uses at most half the lifetime as the advisory lead, and at most
# half that as the mandatory one (cache.refresh_points).
MARGIN, MANDATORY = DEFAULT_REFRESH_MARGIN, BOTOCORE_MANDATORY_REFRESH
HANG = 600.0  # seconds the stand-in takes to answer in a hang: past every timeout of the broker
MISSES = "broker_cache_misses_total"  # calls that went to STS (or joined a call under way)
RENEWALS = "broker_cache_background_renewals_total"
STALE = "broker_cache_stale_served_total"


@dataclass
class Timeline:
    """Runs measured across their refresh points, and as many control runs (credentials far
    from any refresh point) that the same callers ask for in turn, so each window has its own
    same-moment reference against the machine's noise."""

    issued: Issued  # the runs measured: their first credentials and refresh points
    control: dict[str, str]  # control run → its access key id
    requests: list[pb.IssueCredentialsRequest]  # measured and control runs, alternating
    before: Calls  # the baseline window, before the advisory point


async def _timeline(
    stubs: Sequence[Any],
    sts: FakeSts,
    tenant: str,
    prefix: str,
    shape: tuple[int, int, float, float],
    **outage: object,
) -> Timeline:
    """Control runs, then `runs` new runs whose credentials live `lifetime` s; the baseline
    window (`window` s ending 0.5 s before the advisory point), and then the stand-in told
    `outage` (its counts reset). `shape`: runs, workers, lifetime, window."""
    runs, workers, lifetime, window = shape
    control = requests_for(tenant, f"{prefix}-control", runs)
    sts.configure(latency=DEFAULT_LATENCY, lifetime=None, error=None)
    answers = await asyncio.gather(*(stubs[0].IssueCredentials(r) for r in control))
    keys = {r.run_id: a.credentials.access_key_id for r, a in zip(control, answers, strict=True)}
    sts.configure(lifetime=lifetime)
    measured = requests_for(tenant, prefix, runs)
    issued = await issue(stubs[0], measured, MARGIN, MANDATORY)
    requests = [r for pair in zip(measured, control, strict=True) for r in pair]
    end = issued.advisory[0] - 0.5
    await sleep_until(end - window)
    before = await load(stubs, requests, workers, end)
    if before.failed:
        raise RuntimeError(f"{prefix}: calls failed before the advisory point: {before.failures}")
    sts.configure(**outage)
    sts.reset()
    return Timeline(issued, keys, requests, before)


def _latency_rows(report: Report, section: str, label: str, line: Timeline, during: Calls) -> None:
    """The measured runs' calls in `during`: p50, p99 and the slowest beside the baseline
    window's; p99 beside the control runs' in the same window. Targets: p99 at most 1.2 times
    either reference."""
    now, then = during.latencies(line.issued.keys), line.before.latencies(line.issued.keys)
    reference = during.latencies(line.control)
    if not now:
        report.note(section, f"{label}: no call was answered ({during.failed} failed).")
        return
    baseline = "cached, before the advisory point"
    report.add(Figure(section, f"{label}: p50", ms(median(now)), "ms", ms(median(then)), baseline))
    tail, base_tail, same = ms(p99(now)), ms(p99(then)), ms(p99(reference))
    report.add(
        Figure(
            section,
            f"{label}: p99",
            tail,
            "ms",
            base_tail,
            baseline,
            "≤ 1.2×",
            tail <= 1.2 * base_tail,
        )
    )
    report.add(
        Figure(
            section,
            f"{label}: p99 beside control runs, same window",
            tail,
            "ms",
            same,
            "runs far from their refresh point, same callers",
            "≤ 1.2×",
            tail <= 1.2 * same,
        )
    )
    report.add(
        Figure(
            section,
            f"{label}: slowest call",
            ms(now[-1]),
            "ms",
            ms(then[-1]),
            baseline,
            note=f"of {len(now):,} calls; the baseline of {len(then):,}",
        )
    )


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
    await regions.run(world, report, quick=quick)


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
        f"{runs} runs of one tenant measured, and {runs} control runs of it whose "
        "credentials are far from any refresh point, asked for by "
        f"{workers} callers in a closed loop (each asks the runs in turn, over one connection "
        "from the benchmark's process), so every window has a same-moment reference against "
        "the machine's noise. The STS stand-in issues the measured runs credentials that live "
        f"{lifetime} s; with BROKER_REFRESH_MARGIN="
        f"{MARGIN} and BROKER_REFRESH_MANDATORY={MANDATORY} (the defaults) the broker scales "
        "its windows to so short a lifetime: the advisory point half-way through it, the "
        "mandatory point half-way from there to expiry. Baseline: the same calls for "
        f"{window:g} s ending 0.5 s before the advisory point. Just before it the stand-in is "
        f"made to answer AssumeRole after {slow:g} s, so the background renewal that the "
        f"first call past the point starts is still in flight while the calls are measured "
        f"for {window:g} s from the point (a call answered with renewed credentials meanwhile "
        "would be counted beside the calls that went to STS). Calls that went to STS: the "
        "broker's broker_cache_misses over the window (a caller that waited on the renewal is "
        "one).",
    )
    shape = (runs, workers, lifetime, window)
    line = await _timeline(stubs, sts, tenant, "refresh", shape, latency=slow)
    issued = line.issued
    misses, renewals = broker.counter(MISSES), broker.counter(RENEWALS)
    start = issued.advisory[1] + 0.02
    await sleep_until(start)
    during = await load(stubs, line.requests, workers, min(start + window, issued.mandatory[0]))
    misses, renewals = broker.counter(MISSES) - misses, broker.counter(RENEWALS) - renewals
    measured = [r for r in line.requests if r.run_id in issued.keys]
    all_renewed = await renewed(stubs[0], measured, issued.keys, issued.expiry)
    stats = sts.stats()
    sts.configure(latency=DEFAULT_LATENCY, lifetime=None)
    label = "cached call while the renewal is in flight"
    _latency_rows(report, REFRESH, label, line, during)
    report.add(none(REFRESH, f"{label}: calls failed", during.failed))
    fresh = during.renewed(issued.keys)
    report.add(
        none(
            REFRESH,
            f"{label}: calls that went to STS",
            misses,
            f"{fresh} of the calls measured were answered with renewed credentials",
        )
    )
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
            note="" if all_renewed else "not every run had renewed credentials by expiry",
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
    # Not shorter when quick: a call that waits on STS in the mandatory window (botocore's
    # attempts, up to about 3 s) must be able to end before the last seconds, where it fails;
    # with 12 s credentials every call there could, leaving no latency to report.
    lifetime, window = 24, 2.0
    runs, workers = (2, 4) if quick else (4, 8)
    error = "ServiceUnavailable"
    shape = (runs, workers, lifetime, window)
    line = await _timeline(stubs, sts, tenant, "errors", shape, error=error)
    issued, requests = line.issued, line.requests
    misses = broker.counter(MISSES)
    await sleep_until(issued.advisory[1] + 0.02)
    advisory = await load(stubs, requests, workers, issued.mandatory[0] - 0.05)
    misses = broker.counter(MISSES) - misses
    errors = sts.stats()["errors"]
    misses_late, stale = broker.counter(MISSES), broker.counter(STALE)
    await sleep_until(issued.mandatory[1] + 0.02)
    floor = issued.stale_floor()
    mandatory = await load(stubs, requests, workers, issued.expiry - floor - 0.3)
    misses_late = broker.counter(MISSES) - misses_late
    stale = broker.counter(STALE) - stale
    sts.configure(error=None, lifetime=None)
    report.note(
        OUTAGE,
        f"{runs} runs of one tenant and {runs} control runs, {workers} callers in a closed "
        "loop as in the refresh point's rows, on the same broker. Errors: credentials living "
        f"{lifetime} s; baseline as there; from just before the advisory point every "
        f"AssumeRole gets {error} (HTTP 503), and the calls are measured from the advisory "
        "point to the mandatory one (the broker renews in the background, and backs off "
        "after each failure), then from the mandatory point until "
        f"{floor + 0.3:.1f} s before expiry (the broker serves valid credentials stale while "
        f"renewal fails, but not in their last {floor:.1f} s). There a call that finds no "
        "renewal backing off waits for one (botocore's 3 attempts with backoff, one region: "
        "up to about 3 s), and the calls behind it are answered stale until the back-off "
        f"ends; a call whose wait ends inside the last {floor:.1f} s gets UNAVAILABLE "
        "(informative rows: the credentials are about to expire anyway). Calls that went to "
        "STS: broker_cache_misses over the window (each caller that waited on a renewal is "
        "one).",
    )
    label = f"{error}, advisory window"
    _latency_rows(report, OUTAGE, label, line, advisory)
    report.add(none(OUTAGE, f"{label}: calls failed", advisory.failed))
    report.add(
        none(
            OUTAGE,
            f"{label}: calls that went to STS",
            misses,
            f"the stand-in answered {errors:.0f} AssumeRole with {error} meanwhile "
            "(background renewals)",
        )
    )
    label = f"{error}, mandatory window"
    late = mandatory.latencies(issued.keys)
    base = ms(median(line.before.latencies(issued.keys)))
    if late:
        report.add(
            Figure(
                OUTAGE,
                f"{label}: p50",
                ms(median(late)),
                "ms",
                base,
                "cached, before the advisory point",
            )
        )
        report.add(
            Figure(
                OUTAGE,
                f"{label}: slowest call (one that waited for an STS attempt)",
                ms(late[-1]),
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
    shape = (runs, workers, lifetime, window)
    line = await _timeline(stubs, sts, tenant, "hang", shape, latency=HANG)
    issued, requests = line.issued, line.requests
    misses = broker.counter(MISSES)
    await sleep_until(issued.advisory[1] + 0.02)
    advisory = await load(stubs, requests, workers, issued.mandatory[0] - 0.05)
    misses = broker.counter(MISSES) - misses
    hanging = sts.stats()["in_flight"]
    sts.configure(latency=DEFAULT_LATENCY, lifetime=None)
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
    _latency_rows(report, OUTAGE, label, line, advisory)
    report.add(none(OUTAGE, f"{label}: calls failed", advisory.failed))
    report.add(none(OUTAGE, f"{label}: calls that went to STS", misses))
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
