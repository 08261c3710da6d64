"""A reconnect storm: a broker holding many WatchCredentials streams is killed, and every
stream is opened again at once on another broker, which has none of the runs cached. How many
of the reopened streams gRPC core drops (CANCELLED), and how long until all have credentials."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from bench.fakests import DEFAULT_LATENCY
from bench.report import Figure, Report, sts_bound
from bench.streams import BOUND, STREAMS_PER_CHANNEL, answered, channels_for, until
from bench.world import World, capacity, stub_for, warm_up
from broker.client import RECONNECT_CODES, retry_after
from broker.config import DEFAULT_MAX_PENDING_REQUESTS, DEFAULT_MAX_PENDING_SECONDS
from broker.v1 import broker_pb2 as pb

BACKOFF = (0.2, 10.0)  # broker.client.BrokerClient's reconnect backoff, after the first


class Roamer:
    """One run's stream as a launcher holds it: when the stream ends with a code a client
    reconnects after (broker.client.RECONNECT_CODES), it is opened again on the next broker
    of `stubs` (staying on the last) at once, and after a further failure with jittered
    backoff, never sooner than the broker's RetryInfo asks (a fair-share limit), as
    broker.client.BrokerClient does. `endings` holds how each of its streams ended (a status
    code name, "OK" for a clean end); `arrivals` when each message came."""

    def __init__(self, stubs: Sequence[Any], tenant: str, run: str) -> None:
        self.request = pb.WatchCredentialsRequest(tenant_id=tenant, run_id=run)
        self.endings: list[str] = []
        self.arrivals: list[float] = []
        self.task = asyncio.create_task(self._roam(stubs))

    async def _roam(self, stubs: Sequence[Any]) -> None:
        delay = 0.0
        for attempt in itertools.count():
            call = stubs[min(attempt, len(stubs) - 1)].WatchCredentials(self.request)
            try:
                async for _ in call:
                    self.arrivals.append(time.monotonic())
                    delay = 0.0
                self.endings.append("OK")
                return
            except grpc.aio.AioRpcError as error:
                self.endings.append(error.code().name)
                if error.code() not in RECONNECT_CODES:
                    return
                floor = retry_after(error)
            await asyncio.sleep(max(random.uniform(0, delay), floor))  # noqa: S311 - jitter
            delay = min(max(2 * delay, BACKOFF[0]), BACKOFF[1])

    def back_at(self, since: float) -> float | None:
        """When the first message after `since` came, if one has."""
        return next((t for t in self.arrivals if t > since), None)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@dataclass
class Storm:
    """What one storm measured (`storm`)."""

    n: int
    open_took: float  # seconds A took to open the N streams, no storm
    killed: float  # monotonic time A was killed
    backs: list[float | None]  # when each stream on A was back with credentials after the kill
    roamers: list[Roamer]  # the streams on A when it was killed
    moved: list[Roamer]  # the streams that failed on A before the kill (while they opened)
    stats: dict[str, float]  # the STS stand-in's counts during the storm
    cpu: dict[str, float]  # CPU seconds during the storm: "B", "clients"

    @property
    def back(self) -> list[float]:
        return [t for t in self.backs if t is not None]

    @property
    def never_back(self) -> int:
        """Streams on A when it was killed that never had credentials again."""
        return len(self.roamers) - len(self.back)

    @property
    def took(self) -> float:
        """From the kill until the last stream was back."""
        return max(self.back, default=self.killed) - self.killed

    def endings(self, code: str) -> int:
        """Streams that ended with `code`, the ones ended by the kill and before it included."""
        return sum(ending == code for r in self.roamers + self.moved for ending in r.endings)

    @property
    def before(self) -> Counter[str]:
        """How the streams that failed on A before the kill ended there."""
        return Counter(r.endings[0] for r in self.moved)

    @property
    def on_first(self) -> Counter[str]:
        """How the streams on A ended when it was killed."""
        return Counter(r.endings[0] for r in self.roamers if r.endings)

    @property
    def again(self) -> Counter[str]:
        """How reopened streams failed again."""
        return Counter(code for r in self.roamers for code in r.endings[1:])


async def storm(world: World, tenant: str, n: int, b_settings: dict[str, Any]) -> Storm:
    """`n` streams of `tenant` open on broker A (fair-share limits out of the way), A killed,
    every stream reopened at once on broker B, which runs with `b_settings`; both on a new
    store (`tenant` names it and the brokers' logs) and on one STS stand-in."""
    store = await world.verified_store(tenant, [tenant])
    channels = channels_for(n)
    with (
        world.fake_sts(f"{tenant}-sts") as sts,
        world.broker_on(sts, f"{tenant}-a", store, **capacity(BOUND)) as first,
        world.broker_on(sts, f"{tenant}-b", store, **b_settings) as second,
    ):
        async with (
            stub_for(first.target, channels) as to_first,
            stub_for(second.target, channels) as to_second,
        ):
            await warm_up(to_second[0], sts, tenant)
            await warm_up(to_first[0], sts, tenant)
            opened = time.monotonic()
            roamers = [
                Roamer([to_first[i % channels], to_second[i % channels]], tenant, f"run-{i}")
                for i in range(n)
            ]
            await until(lambda: all(r.arrivals or r.task.done() for r in roamers), 600)
            open_took = max((r.arrivals[0] for r in roamers if r.arrivals), default=opened)
            open_took -= opened
            # A stream that failed on A while they opened is on B already (or on its way):
            # the kill does not touch it, and it has no credentials to wait for until renewal.
            moved = [r for r in roamers if r.endings]
            on_first = [r for r in roamers if not r.endings]
            sts.reset()
            cpu = {"B": second.process.cpu_seconds(), "clients": time.process_time()}
            killed = time.monotonic()
            first.process.kill()
            await until(lambda: all(r.back_at(killed) or r.task.done() for r in on_first), 600)
            stats = sts.stats()
            cpu["B"] = second.process.cpu_seconds() - cpu["B"]
            cpu["clients"] = time.process_time() - cpu["clients"]
            backs = [r.back_at(killed) for r in on_first]
            for roamer in roamers:
                await roamer.stop()
    return Storm(n, open_took, killed, backs, on_first, moved, stats, cpu)


async def run(world: World, report: Report, *, quick: bool) -> None:
    section = "Reconnect storm: every stream moves to another broker at once"
    n = 300 if quick else 10_000
    report.note(
        section,
        f"N streams of one tenant, one run each, are open on broker A ({STREAMS_PER_CHANNEL} "
        "per connection). A is killed (SIGKILL, as a crashed or evicted replica): each stream "
        "ends, and each client opens it again at once on broker B, which was serving on the "
        "same store, already connected, and has none of the runs cached, so B makes one "
        "AssumeRole per run while the streams pour in. A client whose reopened stream fails "
        "again retries with broker.client's jittered backoff. Both brokers' AssumeRole goes to "
        f"the STS stand-in ({DEFAULT_LATENCY * 1000:.0f} ms, counting the calls it answers), "
        f"with BROKER_STS_MAX_CONCURRENCY={BOUND}; per-tenant and per-caller limits are raised "
        "out of the way (one tenant holds every stream), and BROKER_MAX_PENDING_REQUESTS and "
        f"BROKER_MAX_PENDING_SECONDS are the broker's defaults ({DEFAULT_MAX_PENDING_REQUESTS:,}"
        f", {DEFAULT_MAX_PENDING_SECONDS} s). Back: the first credentials "
        "a stream receives after the kill. Baseline: the time A took to open them all in the "
        "first place, the same N new sessions with no storm.",
    )
    result = await storm(world, "storm", n, capacity(BOUND))
    back, took, cpu = result.back, result.took, result.cpu
    cancelled = result.endings("CANCELLED")
    hit = sum("CANCELLED" in r.endings for r in result.roamers + result.moved)
    on_a = len(result.roamers)
    again = result.again
    report.add(
        Figure(
            section,
            f"{n:,} streams: all back with credentials after A was killed",
            took,
            "s",
            result.open_took,
            "A opening them, no storm",
            note=f"{len(back) / max(took, 1e-9):.0f} streams/s; CPU meanwhile: broker B "
            f"{cpu['B']:.1f} s, the clients {cpu['clients']:.1f} s",
        )
    )
    report.add(
        Figure(
            section,
            f"{n:,} streams: failed on A while they opened, before the kill",
            len(result.moved),
            "streams",
            target="= 0",
            met=not result.moved,
            note=_codes(result.before) + " (reopened on B then; not counted below)"
            if result.moved
            else "",
        )
    )
    report.add(
        Figure(
            section,
            f"{n:,} streams: never back",
            result.never_back,
            "streams",
            target="= 0",
            met=not result.never_back,
        )
    )
    report.add(
        Figure(
            section,
            f"{n:,} streams: ended CANCELLED",
            cancelled,
            "streams",
            target="= 0",
            met=cancelled == 0,
            note=f"{hit:,} runs hit; A's kill: " + _codes(result.on_first),
        )
    )
    report.add(
        Figure(
            section,
            f"{n:,} streams: reopened streams that failed again",
            sum(again.values()),
            "streams",
            target="= 0",
            met=not again,
            note=_codes(again) if again else "",
        )
    )
    report.add(
        answered(
            section, f"{n:,} streams: AssumeRole answered during the storm", result.stats, on_a
        )
    )
    report.add(
        sts_bound(
            section,
            f"{n:,} streams: most AssumeRole in flight",
            result.stats["most_in_flight"],
            BOUND,
        )
    )


def _codes(counts: Counter[str]) -> str:
    return ", ".join(f"{code} {count:,}" for code, count in counts.most_common())
