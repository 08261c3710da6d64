"""What the broker asks of STS: one AssumeRole per run per credential lifetime (economy), and
what a cache miss adds to STS's own latency, alone and in bursts of new runs (cold path)."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections import Counter

from bench.report import Figure, Report
from bench.world import World, connect, stub_for
from broker.aws import AwsClient
from broker.credentials import run_request
from broker.models import Grant
from broker.v1 import broker_pb2 as pb

STS_LATENCY = 0.050


def _issue(tenant: str, run: str) -> pb.IssueCredentialsRequest:
    return pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run)


async def economy(world: World, report: Report, *, quick: bool) -> None:
    section = "STS economy"
    tenant, steady_runs, new_runs, callers = "economy", 20, (50 if quick else 200), 5
    steady_requests = 300 if quick else 3000
    rng = random.Random(8)  # noqa: S311 - a workload, not security
    with world.broker(tenant) as broker:
        async with stub_for(broker.target, channels=4) as stubs:
            await connect(world, stubs[0], tenant)
            before = len(world.aws.sts.calls)
            slots = asyncio.Semaphore(32)

            async def ask(index: int, run: str) -> None:
                async with slots:
                    await stubs[index % len(stubs)].IssueCredentials(_issue(tenant, run))

            steady = [f"steady-{i}" for i in range(steady_runs)]
            await asyncio.gather(*(ask(i, rng.choice(steady)) for i in range(steady_requests)))
            burst = [f"burst-{i}" for i in range(new_runs)]
            await asyncio.gather(
                *(ask(i, run) for i, run in enumerate(r for r in burst for _ in range(callers)))
            )
    calls = [
        c for c in world.aws.sts.calls[before:] if c.allowed and c.tags.get("tenant") == tenant
    ]
    per_run = Counter(c.session_name for c in calls)
    runs = steady_runs + new_runs
    requests = steady_requests + new_runs * callers
    report.note(
        section,
        f"{requests:,} IssueCredentials: {steady_requests:,} spread at random over {steady_runs} "
        f"runs (32 in flight), then a burst of {new_runs} new runs each asked by {callers} "
        "callers at once. AssumeRole calls counted by the emulator.",
    )
    report.add(
        Figure(
            section,
            "AssumeRole calls",
            len(calls),
            "calls",
            runs,
            "one per run",
            "= 1×",
            len(calls) == runs,
        )
    )
    report.add(Figure(section, "AssumeRole calls per IssueCredentials", len(calls) / requests, ""))
    report.add(
        Figure(
            section,
            "most AssumeRole calls for one run",
            max(per_run.values()),
            "calls",
            1,
            "one",
            "= 1×",
            max(per_run.values()) == 1,
        )
    )


async def cold(world: World, report: Report, *, quick: bool) -> None:
    section = "Cold path: cache misses, STS answering after 50 ms"
    tenant, samples = "cold", (10 if quick else 40)
    bursts = (1, 20) if quick else (1, 100, 1000)
    bound = 32
    world.aws.sts.latency = STS_LATENCY
    try:
        with world.broker(tenant, sts_max_concurrency=bound) as broker:
            async with stub_for(broker.target, channels=8) as stubs:
                await connect(world, stubs[0], tenant)
                connection = (
                    await stubs[0].GetConnection(pb.GetConnectionRequest(tenant_id=tenant))
                ).connection
                aws = AwsClient(
                    region=connection.region,
                    endpoint_url=world.aws.endpoint_url,
                    static_credentials=(
                        world.identity.access_key_id,
                        world.identity.secret_access_key,
                    ),
                )
                await aws.start()
                direct, through = [], []
                try:
                    for i in range(samples):  # side by side: STS alone, then the broker
                        grant = Grant(
                            tenant,
                            f"direct-{i}",
                            connection.role_arn,
                            connection.external_id,
                            connection.region,
                        )
                        started = time.perf_counter()
                        await aws.assume_role(run_request(grant, 3600, ()))
                        direct.append(time.perf_counter() - started)
                        started = time.perf_counter()
                        await stubs[0].IssueCredentials(_issue(tenant, f"miss-{i}"))
                        through.append(time.perf_counter() - started)
                finally:
                    await aws.close()
                ms = 1000 * statistics.median(through)
                base = 1000 * statistics.median(direct)
                report.note(
                    section,
                    f"A miss: IssueCredentials for a new run, beside the same AssumeRole made "
                    f"directly with the broker's own STS client; medians of {samples} each. "
                    f"Bursts: N new runs asked at once over 8 connections, with "
                    f"BROKER_STS_MAX_CONCURRENCY={bound}; the floor is ⌈N/{bound}⌉ × 50 ms.",
                )
                report.add(
                    Figure(
                        section,
                        "one miss, median",
                        ms,
                        "ms",
                        base,
                        "AssumeRole alone",
                        "≤ +2 ms",
                        ms - base <= 2.0,
                        note=f"adds {ms - base:.2f} ms",
                    )
                )
                for n in bursts:
                    world.aws.sts.most_in_flight = 0
                    started = time.perf_counter()
                    await asyncio.gather(
                        *(
                            stubs[i % len(stubs)].IssueCredentials(
                                _issue(tenant, f"burst-{n}-{i}"), timeout=120
                            )
                            for i in range(n)
                        )
                    )
                    took = time.perf_counter() - started
                    floor = math.ceil(n / bound) * STS_LATENCY
                    report.add(
                        Figure(
                            section,
                            f"{n} new runs at once: all answered",
                            took * 1000,
                            "ms",
                            floor * 1000,
                            "the concurrency bound's floor",
                        )
                    )
                    most = world.aws.sts.most_in_flight
                    report.add(
                        Figure(
                            section,
                            f"{n} new runs at once: most AssumeRole in flight",
                            most,
                            "calls",
                            bound,
                            "BROKER_STS_MAX_CONCURRENCY",
                            "≤ 1×",
                            most <= bound,
                        )
                    )
    finally:
        world.aws.sts.latency = 0.0
