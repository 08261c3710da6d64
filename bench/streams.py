"""Many WatchCredentials streams on one broker: memory per stream, and one renewal round —
how long it takes to reach every stream, how it spreads in time, how hard it presses on STS."""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.report import Figure, Report, sts_bound
from bench.world import World, connect, stub_for
from broker.v1 import broker_pb2 as pb

STREAMS_PER_CHANNEL = 500


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


async def _until(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.1)


async def run(world: World, report: Report, *, quick: bool) -> None:
    section = "Streams: WatchCredentials on one broker"
    counts = (100,) if quick else (1000, 10000)
    bound = 32
    report.note(
        section,
        f"N streams, one run each, opened over {STREAMS_PER_CHANNEL} streams per connection. The "
        "emulator issues credentials that live L seconds (long enough that it can renew them "
        "all in time: it makes a few hundred AssumeRole a second here), so each stream is "
        "renewed half way through, minus up to 10 % jitter. Memory: the broker's RSS after "
        "every stream has its first credentials, minus before (it includes each run's cache "
        f"entry). Renewal round: first to last renewal delivered; "
        f"BROKER_STS_MAX_CONCURRENCY={bound}.",
    )
    for n in counts:
        lifetime = max(20.0 if quick else 40.0, n / 75)
        tenant = f"streams-{n}"
        world.aws.sts.session_lifetime = lifetime
        try:
            with world.broker(tenant, sts_max_concurrency=bound) as broker:
                async with stub_for(
                    broker.target, channels=max(1, n // STREAMS_PER_CHANNEL)
                ) as stubs:
                    await connect(world, stubs[0], tenant)
                    await stubs[0].IssueCredentials(
                        pb.IssueCredentialsRequest(tenant_id=tenant, run_id="warm-up")
                    )
                    rss_before = broker.process.rss_bytes()
                    opened = time.monotonic()
                    watchers = [
                        Watcher(stubs[i % len(stubs)], tenant, f"run-{i}") for i in range(n)
                    ]
                    await _until(functools.partial(_all_have, watchers, 1), 600)
                    open_took = time.monotonic() - opened
                    rss_after = broker.process.rss_bytes()
                    world.aws.sts.most_in_flight = 0
                    await _until(functools.partial(_all_have, watchers, 2), 600)
                    ended = sum(w.ended is not None for w in watchers)
                    renewals = sorted(w.arrivals[1] for w in watchers if len(w.arrivals) >= 2)
                    served = sorted(
                        w.arrivals[1] - w.arrivals[0] for w in watchers if len(w.arrivals) >= 2
                    )
                    most = world.aws.sts.most_in_flight
                    for watcher in watchers:
                        await watcher.stop()
        finally:
            world.aws.sts.session_lifetime = None
        per_stream = (rss_after - rss_before) / n
        round_took = renewals[-1] - renewals[0]
        report.add(
            Figure(
                section,
                f"{n:,} streams: all opened with credentials",
                open_took,
                "s",
                note=f"L = {lifetime:.0f} s; {n / open_took:.0f} AssumeRole/s",
            )
        )
        report.add(
            Figure(
                section,
                f"{n:,} streams: memory per stream",
                per_stream / 1024,
                "KiB",
                note=f"RSS {rss_before / 2**20:.0f} → {rss_after / 2**20:.0f} MiB",
            )
        )
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
        report.add(sts_bound(section, f"{n:,} streams: most AssumeRole in flight", most, bound))
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
