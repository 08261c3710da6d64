"""One replica loses, or hangs on, the store while another keeps it: the bounded-staleness rule
in practice. Two brokers share PostgreSQL; B reaches it through a TCP fault proxy that refuses,
resets, swallows or flaps. A disconnects a tenant; B must stop minting new sessions for it
within BROKER_GRANT_MAX_STALENESS, answer every call well inside its deadline (never
INTERNAL), keep re-serving credentials it already issued, and catch up once the store is back,
with its listener and re-check loops alive. Each scenario adds a row to the reliability report
(`make reliability`)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running, connect, settings_for, start_broker
from tests.reliability import Row, record
from tests.tcpfaults import PgProxy

STALENESS = 3.0  # BROKER_GRANT_MAX_STALENESS for B here (30 s by default)
DEADLINE = 1.0  # every call B gets carries this deadline
SLACK = 1.5  # past the bound: the listener's ping interval and the read timeout


@pytest.fixture
def pg_proxy() -> Iterator[PgProxy]:
    with PgProxy(5432).start() as proxy:
        yield proxy


@dataclass
class Pair:
    a: Running
    b: Running
    proxy: PgProxy


@pytest.fixture
async def pair(
    postgres_url: str,
    pg_proxy: PgProxy,
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
) -> AsyncIterator[Pair]:
    settings = settings_for(postgres_url, local_aws, template_url) | {"recheck_interval": 1.0}
    cut_off = settings | {
        "database_url": pg_proxy.url_for(postgres_url),
        "grant_max_staleness": STALENESS,
    }
    async with (
        start_broker(settings, broker_identity) as a,
        start_broker(cut_off, broker_identity) as b,
    ):
        yield Pair(a, b, pg_proxy)
        pg_proxy.mode = "pass"  # let B close cleanly


@dataclass
class Calls:
    """What B answered, by kind of call, with latencies."""

    codes: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def add(self, kind: str, at: float, code: str, latency: float) -> None:
        self.codes.setdefault(kind, []).append((at, code))
        self.latencies.append(latency)

    def count(self) -> int:
        return sum(len(v) for v in self.codes.values())

    def all_codes(self) -> list[str]:
        return [code for answers in self.codes.values() for _, code in answers]


async def ask(b: Running, tenant: str, run: str) -> tuple[str, float]:
    started = time.monotonic()
    try:
        await b.stub.IssueCredentials(
            pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run), timeout=DEADLINE
        )
        code = "OK"
    except grpc.aio.AioRpcError as error:
        code = error.code().name
    return code, time.monotonic() - started


async def traffic(b: Running, tenant: str, calls: Calls, until: float, since: float) -> None:
    """Every 100 ms, a call for the run B has cached and one for a brand-new run."""
    n = 0
    while time.monotonic() < until:
        n += 1
        for kind, run in (("cached", "cached"), ("new", f"new-{n}")):
            code, latency = await ask(b, tenant, run)
            calls.add(kind, time.monotonic() - since, code, latency)
        await asyncio.sleep(0.1)


async def stream_end(stream: Any, within: float) -> grpc.StatusCode | None:
    try:
        async with asyncio.timeout(within):
            while await stream.read() is not grpc.aio.EOF:
                pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    except TimeoutError:
        return None
    return grpc.StatusCode.OK


async def partition(pair: Pair, tenant: str, local_aws: LocalAws, mode: str) -> dict[str, Any]:
    """Cut B off (`mode`), disconnect `tenant` on A, drive traffic at B past the staleness
    bound, then heal and see B catch up. Returns the figures."""
    a, b = pair.a, pair.b
    await connect(a, local_aws, tenant)
    bystander = tenant.replace("tenant", "by")  # to show B's loops alive after the fault
    await connect(a, local_aws, bystander)
    await b.stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="cached"))
    stream = b.stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="w"))
    await stream.read()
    later = b.stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=bystander, run_id="w"))
    await later.read()

    if mode == "flap":
        pair.proxy.set("flap", every=0.3)
    else:
        pair.proxy.mode = mode
    await asyncio.sleep(0.3)
    await a.stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
    disconnected = time.monotonic()
    calls = Calls()
    await traffic(b, tenant, calls, disconnected + STALENESS + SLACK + 1.0, disconnected)
    new_ok = [at for at, code in calls.codes["new"] if code == "OK"]
    stopped_after = max(new_ok, default=0.0)

    pair.proxy.mode = "pass"
    healed = time.monotonic()
    ended = await stream_end(stream, within=10)
    caught_up = time.monotonic() - healed
    after = await ask(b, tenant, "cached")
    await a.stub.Disconnect(pb.DisconnectRequest(tenant_id=bystander))
    told = time.monotonic()
    bystander_ended = await stream_end(later, within=5)
    return {
        "calls": calls,
        "stopped_after": stopped_after,
        "stream_ended": ended,
        "caught_up": caught_up,
        "after": after[0],
        "bystander_ended": bystander_ended,
        "bystander_told": time.monotonic() - told,
    }


@pytest.mark.parametrize("mode", ["refuse", "reset", "hang", "flap"])
async def test_a_cut_off_replica_stops_new_sessions_within_the_staleness_bound(
    pair: Pair, tenant: str, local_aws: LocalAws, mode: str
) -> None:
    figures = await partition(pair, tenant, local_aws, mode)
    calls: Calls = figures["calls"]
    codes = calls.all_codes()
    assert "INTERNAL" not in codes
    assert max(calls.latencies) < DEADLINE, "answered inside the deadline, never at it"
    # New sessions stop within the bound (counted from the Disconnect; B was cut off before).
    assert figures["stopped_after"] <= STALENESS + SLACK, figures
    late = [code for at, code in calls.codes["new"] if at > STALENESS + SLACK]
    assert late
    assert set(late) <= {"UNAVAILABLE", "FAILED_PRECONDITION"}, late
    # Re-serving what was issued to the same run may go on; it never turns into INTERNAL.
    cached = [code for _, code in calls.codes["cached"]]
    if mode != "flap":  # while flapping, B may hear of the Disconnect between resets
        assert set(cached) <= {"OK"}, cached
    # Healed: B learns of the Disconnect, its loops alive.
    assert figures["stream_ended"] == grpc.StatusCode.FAILED_PRECONDITION
    assert figures["after"] == "FAILED_PRECONDITION"
    assert figures["bystander_ended"] == grpc.StatusCode.FAILED_PRECONDITION
    assert figures["bystander_told"] < 2.0
    row = Row(
        f"store {mode} for one replica (of two), Disconnect on the other",
        faults=f"PostgreSQL behind a TCP proxy in mode {mode} for B",
        requests=calls.count(),
    )
    for code in codes:
        if code != "OK":
            row.failed(code)
    p99 = statistics.quantiles(calls.latencies, n=100)[98]
    row.notes = (
        f"new sessions on B stopped {figures['stopped_after']:.1f} s after the Disconnect "
        f"(bound {STALENESS:g} s); cached answers re-served "
        f"{[c for _, c in calls.codes['cached']].count('OK')} times; p99 {p99 * 1000:.0f} ms, "
        f"max {max(calls.latencies) * 1000:.0f} ms (deadline {DEADLINE:g} s); B caught up "
        f"{figures['caught_up']:.1f} s after the store came back; INTERNAL 0; loops alive (a "
        f"later Disconnect reached B in {figures['bystander_told'] * 1000:.0f} ms)"
    )
    record(row)
