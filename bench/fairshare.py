"""Fair share (#15): what the per-tenant limits cost. The hot path with the default limits
beside the same broker with them out of the way (cached answers skip every check); one
new-session check beside the miss it guards; and a reconnect storm under the default limits,
where the per-tenant bucket of new STS sessions sets the pace."""

from __future__ import annotations

import contextlib
import itertools
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from bench.hot import Load, Server, grpc_frame, measure
from bench.report import Figure, Report
from bench.storm import storm
from bench.streams import BOUND
from bench.world import RunningBroker, World, capacity, connect, stub_for
from broker.config import (
    DEFAULT_CALLER_MAX_STREAMS,
    DEFAULT_CALLER_TENANT_BURST,
    DEFAULT_CALLER_TENANT_RATE,
    DEFAULT_STS_MAX_CONCURRENCY,
    DEFAULT_TENANT_MAX_STREAMS,
    DEFAULT_TENANT_STS_BURST,
    DEFAULT_TENANT_STS_RATE,
    DEFAULT_TENANT_VERIFY_CONCURRENCY,
)
from broker.errors import ResourceExhausted
from broker.models import Grant
from broker.quotas import Limits, Settings
from broker.v1 import broker_pb2 as pb

COST = "Fair share: the quota check's cost"
STORM = "Fair share: a reconnect storm under the default limits"
UNLIMITED = "limits out of the way"
DEFAULT_TENANT_SHARE = DEFAULT_STS_MAX_CONCURRENCY // 4  # BROKER_TENANT_STS_CONCURRENCY unset
RPC_CODES = re.compile(r'broker_rpcs_total\{code="(\w+)",method="IssueCredentials"\} ([\d.e+]+)')


def default_limits(clock: Callable[[], float]) -> Limits:
    """The limits a broker has by default, on `clock`."""
    settings = Settings(
        tenant_sts_rate=DEFAULT_TENANT_STS_RATE,
        tenant_sts_burst=DEFAULT_TENANT_STS_BURST,
        tenant_sts_concurrency=DEFAULT_TENANT_SHARE,
        tenant_max_streams=DEFAULT_TENANT_MAX_STREAMS,
        caller_max_streams=DEFAULT_CALLER_MAX_STREAMS,
        tenant_verify_concurrency=DEFAULT_TENANT_VERIFY_CONCURRENCY,
        caller_tenant_rate=DEFAULT_CALLER_TENANT_RATE,
        caller_tenant_burst=DEFAULT_CALLER_TENANT_BURST,
    )
    return Limits(settings, CollectorRegistry(), clock=clock)


def check_cost(calls: int, *, refused: bool) -> float:
    """µs per `Limits.new_session` with the default limits, the best of 3 rounds of `calls`
    (over 64 tenants): admitted, on a clock that refills a token between a tenant's checks;
    or `refused`, every bucket empty on a clock that stands still."""
    tenants = 64
    grants = [
        Grant(f"tenant-{i % tenants}", f"run-{i}", "arn", "id", "us-east-1") for i in range(calls)
    ]
    best = float("inf")
    for _ in range(3):
        if refused:
            limits = default_limits(lambda: 0.0)
            for grant in grants[:tenants] * (DEFAULT_TENANT_STS_BURST + 1):
                with contextlib.suppress(ResourceExhausted):
                    limits.new_session(grant)
        else:
            # Each call moves the clock on by a token's worth over all the tenants.
            step = 1 / DEFAULT_TENANT_STS_RATE / tenants
            limits = default_limits(itertools.count(0.0, step).__next__)
        check = limits.new_session
        started = time.perf_counter()
        for grant in grants:
            try:
                check(grant)
            except ResourceExhausted:
                if not refused:
                    raise
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def _issue(tenant: str, run: str) -> pb.IssueCredentialsRequest:
    return pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run)


def _codes(broker: RunningBroker) -> Callable[[], dict[str, float]]:
    """The broker's IssueCredentials answers by status code (for hot.measure's check that
    every answer was OK)."""

    def read() -> dict[str, float]:
        return {m[1]: float(m[2]) for m in RPC_CODES.finditer(broker.scrape())}

    return read


async def run(world: World, report: Report, *, quick: bool) -> None:
    """The quota check's cost: the hot path and a miss with the default limits beside the same
    with them out of the way, and one check measured in this process."""
    concurrencies = (16,) if quick else (1, 16, 64)
    seconds, rounds, misses = (1, 1, 20) if quick else (2, 3, 100)
    measured: dict[tuple[str, int], list[tuple[Load, float]]] = {}
    miss_cpu: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        brokers: list[tuple[str, RunningBroker, Any]] = []
        for name, settings in (
            ("default limits", {}),
            (UNLIMITED, capacity(DEFAULT_STS_MAX_CONCURRENCY)),
        ):
            broker = stack.enter_context(world.broker(f"quota-{len(brokers)}", **settings))
            (stub,) = await stack.enter_async_context(stub_for(broker.target))
            await connect(world, stub, f"quota-{len(brokers)}")
            brokers.append((name, broker, stub))
        servers: list[tuple[Server, Path]] = []
        for index, (name, broker, stub) in enumerate(brokers):
            request = _issue(f"quota-{index}", "run-1")
            await stub.IssueCredentials(request)
            frame = world.folder / f"quota-{index}.frame"
            frame.write_bytes(grpc_frame(request))
            server = Server(name, broker.port, broker.process.process.pid, "uvloop", _codes(broker))
            servers.append((server, frame))
        blocks = 4  # misses side by side too: in blocks, the first of each pair alternating
        for block in range(blocks):
            order = range(len(brokers)) if block % 2 == 0 else reversed(range(len(brokers)))
            for index in order:
                name, broker, stub = brokers[index]
                cpu = broker.process.cpu_seconds()
                for i in range(misses // blocks):
                    run = f"miss-{block}-{i}"
                    await stub.IssueCredentials(_issue(f"quota-{index}", run))
                spent = broker.process.cpu_seconds() - cpu
                miss_cpu[name] = miss_cpu.get(name, 0.0) + spent / misses * 1e6
        for concurrency in concurrencies:
            for turn in range(rounds):  # side by side: each round loads both, in turn
                for server, frame in servers if turn % 2 == 0 else servers[::-1]:
                    result = measure(
                        server, frame, concurrency, seconds, world.folder / "h2load.log"
                    )
                    measured.setdefault((server.name, concurrency), []).append(result)
    admitted = check_cost(20_000 if quick else 200_000, refused=False)
    refused = check_cost(5_000 if quick else 50_000, refused=True)
    report.note(
        COST,
        "Two brokers side by side, each serving one tenant on the emulator: one with the "
        f"default fair-share limits (a tenant's new STS sessions {DEFAULT_TENANT_STS_RATE:g}/s, "
        f"burst {DEFAULT_TENANT_STS_BURST}; its STS share {DEFAULT_TENANT_SHARE} of "
        f"{DEFAULT_STS_MAX_CONCURRENCY} slots; streams per tenant and per caller), one with "
        f"them raised out of the way. Cached IssueCredentials loaded by h2load as in the hot "
        f"path's rows: {rounds} round(s) of {seconds} s after 1 s of warm-up, each round "
        "loading both in turn (which goes first alternates), medians shown, every answer "
        "checked OK. A miss: the broker's "
        f"CPU time per IssueCredentials for a new run ({misses} one after another, AssumeRole "
        "answered by the emulator). One check: `Limits.new_session` (the cache's admit, called "
        "only on a miss for a run it holds nothing for) with the default limits, timed in the "
        "benchmark's own process over 64 tenants, best of 3 rounds.",
    )
    for concurrency in concurrencies:
        ours = measured[("default limits", concurrency)]
        open_ = measured[(UNLIMITED, concurrency)]
        label = f"default limits, c={concurrency}"
        rps = statistics.median(x.rps for x, _ in ours)
        base_rps = statistics.median(x.rps for x, _ in open_)
        report.add(
            Figure(
                COST,
                f"{label}: throughput",
                rps,
                "RPC/s",
                base_rps,
                UNLIMITED,
                "≈ 1× (≥ 0.95×)",
                rps >= 0.95 * base_rps,
            )
        )
        p99 = statistics.median(x.p99_ms for x, _ in ours)
        base_p99 = statistics.median(x.p99_ms for x, _ in open_)
        report.add(
            Figure(
                COST,
                f"{label}: p99",
                p99,
                "ms",
                base_p99,
                UNLIMITED,
                "≤ 1.2×",
                p99 <= 1.2 * base_p99,
            )
        )
        cpu = statistics.median(c for _, c in ours)
        base_cpu = statistics.median(c for _, c in open_)
        report.add(Figure(COST, f"{label}: CPU per call", cpu, "µs", base_cpu, UNLIMITED))
    report.add(
        Figure(
            COST,
            "a miss (new run): broker CPU, default limits",
            miss_cpu["default limits"],
            "µs",
            miss_cpu[UNLIMITED],
            UNLIMITED,
        )
    )
    per_miss = miss_cpu["default limits"]
    report.add(
        Figure(
            COST,
            "one new-session check, admitted",
            admitted,
            "µs",
            per_miss,
            "broker CPU per miss",
            "≤ 0.01×",
            admitted <= 0.01 * per_miss,
            note=f"{admitted / per_miss:.3%} of a miss",
        )
    )
    report.add(
        Figure(
            COST,
            "one new-session check, refused (RESOURCE_EXHAUSTED built)",
            refused,
            "µs",
            per_miss,
            "broker CPU per miss",
            note=f"{refused / per_miss:.3%} of a miss",
        )
    )


async def storm_default_limits(world: World, report: Report, *, quick: bool) -> None:
    """The reconnect storm once with the limits out of the way and once with the defaults."""
    n = 600 if quick else 2_000
    pace = max(0.0, (n - DEFAULT_TENANT_STS_BURST) / DEFAULT_TENANT_STS_RATE)
    report.note(
        STORM,
        "The reconnect storm of the reconnect-storm section (broker A killed, every stream "
        "reopened at once on broker B, which has none of the runs cached; each client "
        "reconnecting with broker.client's jittered backoff, never sooner than the broker's "
        f"RetryInfo asks), run twice at {n:,} streams of one tenant: with B's fair-share "
        "limits out of the way, then with B's defaults (A's out of the way both times: it "
        "only opens the streams). "
        f"By default a tenant starts at most {DEFAULT_TENANT_STS_BURST} new STS sessions at "
        f"once and {DEFAULT_TENANT_STS_RATE:g} a second after that "
        "(BROKER_TENANT_STS_BURST, BROKER_TENANT_STS_RATE), and holds "
        f"{DEFAULT_TENANT_SHARE} of the {DEFAULT_STS_MAX_CONCURRENCY} STS slots "
        "(BROKER_TENANT_STS_CONCURRENCY): a stream refused a new session gets "
        "RESOURCE_EXHAUSTED and comes back later. The bucket alone lets the last of "
        f"{n:,} sessions start after about ({n:,} − {DEFAULT_TENANT_STS_BURST}) ÷ "
        f"{DEFAULT_TENANT_STS_RATE:g} = {pace:.0f} s; a client's backoff (up to 10 s) adds to "
        "that.",
    )
    unlimited = await storm(world, "storm-unlimited", n, capacity(BOUND))
    limited = await storm(world, "storm-limited", n, {"sts_max_concurrency": BOUND})
    report.add(
        Figure(
            STORM,
            f"{n:,} streams, {UNLIMITED}: all back with credentials after A was killed",
            unlimited.took,
            "s",
            unlimited.open_took,
            "A opening them, no storm",
            note=f"{unlimited.endings('RESOURCE_EXHAUSTED')} RESOURCE_EXHAUSTED, "
            f"{unlimited.endings('CANCELLED')} CANCELLED",
        )
    )
    label = f"{n:,} streams, default limits"
    report.add(
        Figure(
            STORM,
            f"{label}: all back with credentials after A was killed",
            limited.took,
            "s",
            unlimited.took,
            "the same storm, limits out of the way",
            note=f"the new-session bucket's own pace: {pace:.0f} s",
        )
    )
    report.add(
        Figure(
            STORM,
            f"{label}: never back",
            limited.never_back,
            "streams",
            target="= 0",
            met=not limited.never_back,
            note=f"not counted: {len(limited.moved)} that failed on A before the kill"
            if limited.moved
            else "",
        )
    )
    cancelled = limited.endings("CANCELLED")
    report.add(
        Figure(
            STORM,
            f"{label}: ended CANCELLED",
            cancelled,
            "streams",
            target="= 0",
            met=cancelled == 0,
        )
    )
    refused = limited.endings("RESOURCE_EXHAUSTED")
    hit = sum("RESOURCE_EXHAUSTED" in r.endings for r in limited.roamers)
    report.add(
        Figure(
            STORM,
            f"{label}: reopened streams refused RESOURCE_EXHAUSTED (each retried)",
            refused,
            "streams",
            note=f"{hit:,} runs refused at least once; "
            f"{sum(limited.again.values()) - refused} other failures",
        )
    )
    calls = limited.stats["AssumeRole"]
    report.add(
        Figure(
            STORM,
            f"{label}: AssumeRole answered during the storm",
            calls,
            "calls",
            len(limited.roamers),
            "one per run on A",
            "= 1×",
            calls == len(limited.roamers),
        )
    )
    most = limited.stats["most_in_flight"]
    report.add(
        Figure(
            STORM,
            f"{label}: most AssumeRole in flight",
            most,
            "calls",
            DEFAULT_TENANT_SHARE,
            "the tenant's STS share (default)",
            "≤ 1×",
            most <= DEFAULT_TENANT_SHARE,
        )
    )
