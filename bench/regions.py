"""Nobody waits on STS (#14), regional failover: new runs on a broker with two STS regions,
each an STS stand-in of its own, before and after the first one goes down."""

from __future__ import annotations

import statistics

from bench.calls import Calls, miss, ms, none, p99
from bench.fakests import DEFAULT_LATENCY
from bench.report import Figure, Report
from bench.world import World, stub_for, warm_up

REGION = "Nobody waits on STS: one STS region down"


async def run(world: World, report: Report, *, quick: bool) -> None:
    """N new runs with both regions up, then N + 1 with the first down (the first apart)."""
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
                await miss(stub, tenant, f"up-{i}", up)
            first.kill()
            down = Calls()
            for i in range(n + 1):
                await miss(stub, tenant, f"down-{i}", down)
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
    base_p50, base_p99 = statistics.median(up.latencies()), p99(up.latencies())
    paid = [latency for latency, run, _ in down.answers if run == "down-0"]
    if paid:
        report.add(
            Figure(
                REGION,
                f"first new run after {first_region} went down (pays the failover)",
                ms(paid[0]),
                "ms",
                ms(base_p50),
                baseline,
                note=f"{ms(paid[0] - base_p50):+.0f} ms",
            )
        )
    after = sorted(latency for latency, run, _ in down.answers if run != "down-0")
    if after:
        p50, tail = statistics.median(after), p99(after)
        report.add(
            Figure(
                REGION,
                "new runs once the breaker is open: median",
                ms(p50),
                "ms",
                ms(base_p50),
                baseline,
                note=f"{ms(p50 - base_p50):+.2f} ms",
            )
        )
        report.add(
            Figure(
                REGION,
                "new runs once the breaker is open: p99",
                ms(tail),
                "ms",
                ms(base_p99),
                baseline,
                note=f"{ms(tail - base_p99):+.2f} ms",
            )
        )
    report.add(
        none(
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
