"""Many WatchCredentials streams on one broker, its AssumeRole answered by the STS stand-in:
how fast it opens them (its own renewal capacity), memory per stream, and one renewal round —
how long it takes to reach every stream, how it spreads in time, how hard it presses on STS."""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.fakests import DEFAULT_LATENCY, FakeSts
from bench.report import Figure, Report, sts_bound
from bench.world import World, capacity, stub_for, warm_up
from broker.v1 import broker_pb2 as pb

STREAMS_PER_CHANNEL = 500
BOUND = 32  # BROKER_STS_MAX_CONCURRENCY of the brokers measured


class Watcher:
    """One stream, read in the background: when each new access key arrived."""

    def __init__(self, stub: Any, tenant: str, run: str) -> None:
        self.call = stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id=run))
        self.arrivals: list[float] = []
        self.ended: str | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for _ in self.call:
                self.arrivals.append(time.monotonic())
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self.ended = type(exc).__name__
            if hasattr(exc, "code"):
                self.ended = exc.code().name

    async def stop(self) -> None:
        self.call.cancel()
        await self.task


def _all_have(watchers: list[Watcher], messages: int) -> bool:
    """Whether every stream has had `messages` messages (or ended)."""
    return all(len(w.arrivals) >= messages or w.ended for w in watchers)


async def until(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.1)


def channels_for(streams: int) -> int:
    return max(1, streams // STREAMS_PER_CHANNEL)


def answered(section: str, what: str, stats: dict[str, float], expected: int) -> Figure:
    """The AssumeRole calls the stand-in answered, against the one per run expected."""
    calls = stats["AssumeRole"]
    return Figure(section, what, calls, "calls", expected, "one per run", "= 1×", calls == expected)


async def run(world: World, report: Report, *, quick: bool) -> None:
    section = "Streams: WatchCredentials on one broker"
    counts = (100,) if quick else (1000, 10000)
    ceiling = BOUND / DEFAULT_LATENCY
    report.note(
        section,
        f"N streams of one tenant, one run each, opened at once over {STREAMS_PER_CHANNEL} "
        "streams per connection. The broker's AssumeRole goes to the STS stand-in "
        f"(bench/fakests.py, its own process, answering after {DEFAULT_LATENCY * 1000:.0f} ms), "
        "which counts the calls it answers; the tenant's role was verified beforehand against "
        "the emulator, whose STS enforces trust policies. With "
        f"BROKER_STS_MAX_CONCURRENCY={BOUND}, STS could answer {ceiling:.0f} AssumeRole/s: the "
        "rate at which streams open is the broker's own capacity up to that ceiling. The "
        "per-tenant and per-caller limits (new sessions per second, a tenant's share of the "
        "STS slots, open streams) are raised out of the way. The stand-in issues credentials "
        "that live L seconds, long enough that every stream is open before the first is "
        "renewed; each is renewed half way through, minus up to 10 % jitter. Memory: the "
        "broker's RSS after every stream has its first credentials, minus before (it includes "
        "each run's cache entry). Renewal round: first to last renewal delivered; its "
        "AssumeRole count is read once every stream has its second credentials.",
    )
    for n in counts:
        await _streams(world, report, section, n, quick=quick)


async def _streams(world: World, report: Report, section: str, n: int, *, quick: bool) -> None:
    lifetime = max(20.0 if quick else 40.0, n / 60)  # the first renewal after 0.45 L
    tenant = f"streams-{n}"
    store = await world.verified_store(tenant, [tenant])
    with (
        world.fake_sts(f"{tenant}-sts", lifetime=lifetime) as sts,
        world.broker_on(sts, tenant, store, **capacity(BOUND)) as broker,
    ):
        async with stub_for(broker.target, channels=channels_for(n)) as stubs:
            await warm_up(stubs[0], sts, tenant)
            rss_before, cpu_before = broker.process.rss_bytes(), broker.process.cpu_seconds()
            opened = time.monotonic()
            watchers = [Watcher(stubs[i % len(stubs)], tenant, f"run-{i}") for i in range(n)]
            await until(functools.partial(_all_have, watchers, 1), 600)
            open_took = (
                max((w.arrivals[0] for w in watchers if w.arrivals), default=opened) - opened
            )
            cpu_per_stream = (broker.process.cpu_seconds() - cpu_before) / n
            rss_after = broker.process.rss_bytes()
            at_open = _read_and_reset(sts)
            await until(functools.partial(_all_have, watchers, 2), 600)
            at_renewal = sts.stats()
            ended = sum(w.ended is not None for w in watchers)
            renewals = sorted(w.arrivals[1] for w in watchers if len(w.arrivals) >= 2)
            served = sorted(w.arrivals[1] - w.arrivals[0] for w in watchers if len(w.arrivals) >= 2)
            for watcher in watchers:
                await watcher.stop()
    rate = n / open_took
    report.add(
        Figure(
            section,
            f"{n:,} streams: all opened with credentials",
            open_took,
            "s",
            note=f"L = {lifetime:.0f} s",
        )
    )
    report.add(
        Figure(
            section,
            f"{n:,} streams: opened per second (one AssumeRole each)",
            rate,
            "streams/s",
            BOUND / DEFAULT_LATENCY,
            "STS slots ÷ STS latency",
            note=f"broker CPU {cpu_per_stream * 1e3:.2f} ms per stream opened",
        )
    )
    report.add(answered(section, f"{n:,} streams: AssumeRole answered while opening", at_open, n))
    report.add(
        sts_bound(
            section,
            f"{n:,} streams: most AssumeRole in flight while opening",
            at_open["most_in_flight"],
            BOUND,
        )
    )
    per_stream = (rss_after - rss_before) / n
    report.add(
        Figure(
            section,
            f"{n:,} streams: memory per stream",
            per_stream / 1024,
            "KiB",
            note=f"RSS {rss_before / 2**20:.0f} → {rss_after / 2**20:.0f} MiB",
        )
    )
    round_took = renewals[-1] - renewals[0]
    report.add(
        Figure(
            section,
            f"{n:,} streams: renewal round, first to last",
            round_took,
            "s",
            open_took,
            "time to open them all",
        )
    )
    half = lifetime / 2
    report.add(
        Figure(
            section,
            f"{n:,} streams: renewed after (min / median / max)",
            statistics.median(served),
            "s",
            half,
            "half the lifetime",
            note=f"{served[0]:.1f} / {statistics.median(served):.1f} / {served[-1]:.1f} s",
        )
    )
    report.add(
        answered(section, f"{n:,} streams: AssumeRole answered in the renewal round", at_renewal, n)
    )
    report.add(
        sts_bound(
            section,
            f"{n:,} streams: most AssumeRole in flight in the renewal round",
            at_renewal["most_in_flight"],
            BOUND,
        )
    )
    late = sum(after >= lifetime for after in served)
    report.add(
        Figure(
            section,
            f"{n:,} streams: renewed only after their credentials expired",
            late,
            "streams",
            target="= 0",
            met=late == 0,
        )
    )
    report.add(
        Figure(
            section,
            f"{n:,} streams: streams that ended",
            ended,
            "streams",
            target="= 0",
            met=ended == 0,
        )
    )


def _read_and_reset(sts: FakeSts) -> dict[str, float]:
    stats = sts.stats()
    sts.reset()
    return stats
