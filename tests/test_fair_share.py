"""A noisy tenant at its limits leaves a quiet tenant's success rate and latency as they were:
a small, bounded load test through gRPC, with STS answering after 50 ms (a fault proxy in front
of the emulator). Three phases of the same quiet workload on one broker's settings each:

1. the quiet tenant alone;
2. beside a noisy tenant's launcher, looping on new run ids and ignoring RetryInfo, with the
   default shape of the limits (a tenant's share of STS slots and its new-session bucket);
3. the same noise with no fair share (a tenant may take every STS slot, any rate), to show
   what the limits are for.

Rows go to the reliability report (docs/reliability.md). Assertions are on outcomes, never on
timings: the quiet tenant loses no call with the limits on; the noisy one is held to its bucket.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from tests import reliability
from tests.conftest import Running, connect, settings_for, start_broker
from tests.faults import FaultyAws

STS_LATENCY = 0.05
PHASE_SECONDS = 3.0
QUIET_NEW_RUNS_PER_SECOND = 4  # within its bucket (5 a second)
QUIET_CACHED_PER_NEW = 5
NOISY_LOOPS = 16
NOISY_PAUSE = 0.02  # a launcher's loop, not a flood of the broker's CPU
SHARED = {"sts_max_concurrency": 8}
FAIR = SHARED | {"tenant_sts_concurrency": 2, "tenant_sts_rate": 5.0, "tenant_sts_burst": 10}
UNFAIR = SHARED | {"tenant_sts_concurrency": 8, "tenant_sts_rate": 1e6, "tenant_sts_burst": 10**6}


@dataclass
class Tally:
    new: list[float] = field(default_factory=list)  # seconds per new run's first credentials
    cached: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        def ms(values: list[float], q: int) -> str:
            if len(values) < 2:
                return "-"
            return f"{statistics.quantiles(values, n=100)[q - 1] * 1000:.0f}"

        total = sum(self.codes.values())
        ok = self.codes["OK"]
        return (
            f"quiet: {ok}/{total} OK; new run p50 {ms(self.new, 50)} ms, p95 {ms(self.new, 95)}"
            f" ms; cached p95 {ms(self.cached, 95)} ms"
        )


async def quiet_workload(running: Running, tenant: str, phase: str) -> Tally:
    tally = Tally()
    stop = time.monotonic() + PHASE_SECONDS
    runs = 0
    while time.monotonic() < stop:
        started = time.monotonic()
        for kind, run in [("new", f"{phase}-{runs}")] + [
            ("cached", f"{phase}-{runs}")
        ] * QUIET_CACHED_PER_NEW:
            begun = time.perf_counter()
            try:
                await running.stub.IssueCredentials(
                    pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run), timeout=10
                )
                tally.codes["OK"] += 1
                (tally.new if kind == "new" else tally.cached).append(time.perf_counter() - begun)
            except grpc.aio.AioRpcError as error:
                tally.codes[error.code().name] += 1
        runs += 1
        await asyncio.sleep(max(0.0, 1 / QUIET_NEW_RUNS_PER_SECOND - (time.monotonic() - started)))
    return tally


async def noisy_workload(running: Running, tenant: str, until: asyncio.Event) -> Counter[str]:
    codes: Counter[str] = Counter()
    serial = iter(range(10**9))

    async def loop() -> None:
        while not until.is_set():
            try:
                await running.stub.IssueCredentials(
                    pb.IssueCredentialsRequest(tenant_id=tenant, run_id=f"n{next(serial)}"),
                    timeout=10,
                )
                codes["OK"] += 1
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] += 1
            await asyncio.sleep(NOISY_PAUSE)

    await asyncio.gather(*(loop() for _ in range(NOISY_LOOPS)))
    return codes


async def phase(running: Running, name: str, *, noisy: bool) -> tuple[Tally, Counter[str]]:
    until = asyncio.Event()
    noise = asyncio.ensure_future(noisy_workload(running, "noisy", until)) if noisy else None
    if noise is not None:
        await asyncio.sleep(0.3)  # the noise is at its limits before the quiet tenant starts
    tally = await quiet_workload(running, "quiet", name)
    until.set()
    return tally, (await noise if noise is not None else Counter())


@pytest.fixture
def faults(local_aws: LocalAws) -> Any:
    proxy = FaultyAws(local_aws.endpoint_url).start()
    yield proxy
    proxy.stop()


async def run_phases(
    limits: dict[str, Any],
    base: dict[str, Any],
    identity: Identity,
    local_aws: LocalAws,
    faults: FaultyAws,
    phases: list[tuple[str, bool]],
) -> dict[str, tuple[Tally, Counter[str]]]:
    faults.clear()
    async with start_broker(
        base | {"aws_endpoint_url": faults.endpoint_url} | limits, identity
    ) as running:
        for tenant in ("quiet", "noisy"):
            await connect(running, local_aws, tenant)
        faults.inject("latency", seconds=STS_LATENCY)
        return {name: await phase(running, name, noisy=noisy) for name, noisy in phases}


async def test_a_noisy_tenant_at_its_limits_leaves_a_quiet_one_as_it_was(
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    faults: FaultyAws,
    tmp_path: Path,
) -> None:
    base = settings_for(f"sqlite:///{tmp_path / 'fair.db'}", local_aws, template_url)
    fair = await run_phases(
        FAIR, base, broker_identity, local_aws, faults, [("alone", False), ("noisy", True)]
    )
    base = settings_for(f"sqlite:///{tmp_path / 'unfair.db'}", local_aws, template_url)
    unfair = await run_phases(UNFAIR, base, broker_identity, local_aws, faults, [("unfair", True)])

    alone, _ = fair["alone"]
    beside, noise = fair["noisy"]
    without, flood = unfair["unfair"]
    for scenario, tally, noisy in (
        ("fair share: quiet tenant alone", alone, Counter()),
        ("fair share: quiet tenant beside a noisy one at its limits", beside, noise),
        ("no fair share (for contrast): the same noise", without, flood),
    ):
        row = reliability.Row(
            scenario,
            faults=f"STS answers after {STS_LATENCY * 1000:.0f} ms"
            + (f"; noisy tenant: {NOISY_LOOPS} loops of new runs" if noisy else ""),
            requests=sum(tally.codes.values()),
            notes=tally.summary()
            + (
                "; noisy: " + ", ".join(f"{c} {n}" for c, n in sorted(noisy.items()))
                if noisy
                else ""
            ),
        )
        for code, count in tally.codes.items():
            if code != "OK":
                row.failures[code] += count
        reliability.record(row)

    # The quiet tenant lost nothing, with the noise or without it.
    assert set(alone.codes) == {"OK"}, alone.codes
    assert set(beside.codes) == {"OK"}, beside.codes
    # The noisy one was held to its bucket: a burst of 10 and 5 a second, no more.
    assert noise["RESOURCE_EXHAUSTED"] > 0
    assert noise["OK"] <= FAIR["tenant_sts_burst"] + FAIR["tenant_sts_rate"] * (PHASE_SECONDS + 2.0)
    assert set(noise) <= {"OK", "RESOURCE_EXHAUSTED"}
    # Without the limits the same loops got every session they asked for.
    assert flood["RESOURCE_EXHAUSTED"] == 0
    assert flood["OK"] > noise["OK"]
