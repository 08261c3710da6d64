"""What the broker asks of STS: one AssumeRole per run per credential lifetime (economy, counted
by the emulator), and what a cache miss adds to STS's own latency, alone and in bursts of new
runs (cold path, against the STS stand-in)."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from bench.fakests import FakeSts
from bench.procs import pinned
from bench.report import Figure, Report, sts_bound
from bench.world import SERVER_CORE, World, capacity, connect, stub_for, warm_up
from broker.config import DEFAULT_REGION
from broker.v1 import broker_pb2 as pb

STS_LATENCY = 0.050


def _issue(tenant: str, run: str) -> pb.IssueCredentialsRequest:
    return pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run)


async def economy(world: World, report: Report, *, quick: bool) -> None:
    section = "STS economy"
    tenant, steady_runs, new_runs, callers = "economy", 20, (50 if quick else 200), 5
    steady_requests = 300 if quick else 3000
    rng = random.Random(8)  # noqa: S311 - a workload, not security
    with world.broker(tenant, **capacity(32)) as broker:
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
    store = await world.verified_store(tenant, [tenant])
    with (
        world.fake_sts("cold-sts", latency=STS_LATENCY) as sts,
        world.broker_on(sts, tenant, store, **capacity(bound)) as broker,
    ):
        async with stub_for(broker.target, channels=8) as stubs:
            await warm_up(stubs[0], sts, tenant)
            connection = (
                await stubs[0].GetConnection(pb.GetConnectionRequest(tenant_id=tenant))
            ).connection
            direct = _direct(world, sts, connection, bound, samples, bursts)
            through = []
            for i in range(samples):
                started = time.perf_counter()
                await stubs[0].IssueCredentials(_issue(tenant, f"miss-{i}"))
                through.append(time.perf_counter() - started)
            ms = 1000 * statistics.median(through)
            base = 1000 * statistics.median(direct["latencies"])
            ceiling = bound / STS_LATENCY
            report.note(
                section,
                "A miss: IssueCredentials for a new run, against the same AssumeRole made by "
                "the broker's own STS client alone in its own process (pinned like the broker, "
                "on the same event loop, uvloop); "
                f"medians of {samples} each. Bursts: N new runs asked at once over 8 "
                f"connections, with BROKER_STS_MAX_CONCURRENCY={bound}, against the same N calls "
                "made directly under the same bound. Both call the STS stand-in "
                "(bench/fakests.py: its own process on the load generators' core, answering "
                f"after {STS_LATENCY * 1000:.0f} ms with credentials of real size), which "
                "counts the calls it answers; the tenant's role was verified beforehand "
                "against the emulator, whose STS enforces trust policies. A burst's ceiling "
                f"is thus {bound} ÷ {STS_LATENCY * 1000:.0f} ms = {ceiling:.0f} AssumeRole/s, "
                "or the CPU of the STS client, whichever is lower. The per-tenant limits are "
                "raised out of the way (one tenant may use every STS slot).",
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
                sts.reset()
                cpu = sts.stats()["cpu_seconds"]
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
                answered = sts.stats()
                report.add(
                    Figure(
                        section,
                        f"{n} new runs at once: all answered",
                        took * 1000,
                        "ms",
                        direct["bursts"][str(n)] * 1000,
                        "the same calls made directly",
                        note=f"{n / took:.0f} AssumeRole/s" if n > 1 else "",
                    )
                )
                report.add(
                    Figure(
                        section,
                        f"{n} new runs at once: AssumeRole answered by the stand-in",
                        answered["AssumeRole"],
                        "calls",
                        n,
                        "one per run",
                        "= 1×",
                        answered["AssumeRole"] == n,
                    )
                )
                report.add(
                    sts_bound(
                        section,
                        f"{n} new runs at once: most AssumeRole in flight",
                        answered["most_in_flight"],
                        bound,
                    )
                )
            report.note(
                section,
                f"The stand-in spent {1e6 * (answered['cpu_seconds'] - cpu) / n:.0f} µs of CPU "
                f"per AssumeRole in the burst of {n}.",
            )


def _direct(
    world: World,
    sts: FakeSts,
    connection: pb.Connection,
    bound: int,
    samples: int,
    bursts: tuple[int, ...],
) -> dict[str, Any]:
    """bench.direct's measurements: the same AssumeRole calls, by the broker's STS client alone."""
    spec = {
        "region": DEFAULT_REGION,
        "endpoint": sts.url,
        "key": world.identity.access_key_id,
        "secret": world.identity.secret_access_key,
        "grant": [
            connection.tenant_id,
            "",
            connection.role_arn,
            connection.external_id,
            connection.region,
        ],
        "bound": bound,
        "samples": samples,
        "bursts": bursts,
    }
    done = subprocess.run(
        pinned([sys.executable, "-m", "bench.direct", json.dumps(spec)], SERVER_CORE),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    direct: dict[str, Any] = json.loads(done.stdout)
    return direct
