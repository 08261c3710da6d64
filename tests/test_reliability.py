"""Fault injection: STS down, throttling, slow and hanging, restarts and crashes, and a soak.
Runs that hold valid credentials must not notice. Each scenario adds a row to the reliability
report printed at the end of the run (`make reliability` keeps it in docs/reliability.md)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc
from tests.conftest import connect, settings_for, start_broker
from tests.faults import FaultyAws
from tests.processes import BrokerProcess
from tests.reliability import Row, record


@pytest.fixture(scope="session")
def faults(local_aws: LocalAws) -> Iterator[FaultyAws]:
    proxy = FaultyAws(local_aws.endpoint_url).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def faulty(
    faults: FaultyAws, local_aws: LocalAws, template_url: str, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """Settings for a broker whose AWS is behind the fault injector."""
    faults.clear()
    faults.most_in_flight = 0
    yield settings_for(f"sqlite:///{tmp_path / 'broker.db'}", local_aws, template_url) | {
        "aws_endpoint_url": faults.endpoint_url,
        "refresh_margin": 60,
    }
    faults.clear()


def issue(tenant: str, run: str) -> pb.IssueCredentialsRequest:
    return pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run)


def seconds_left(credentials: pb.Credentials) -> float:
    expiration = credentials.expiration
    return expiration.seconds + expiration.nanos / 1e9 - time.time()


def valid(credentials: pb.Credentials, margin: float = 0.0) -> bool:
    return seconds_left(credentials) > margin


async def valid_on_arrival(call: Any) -> bool:
    """Whether the credentials an IssueCredentials call returns are valid when they arrive (not
    when the slowest of a batch of calls is done)."""
    answer = await call
    return valid(answer.credentials)


class StreamWatcher:
    """Reads a stream in the background: what it received, and how it ended (if it did)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.received: list[pb.Credentials] = []
        self.ended: grpc.StatusCode | None = None
        self.ended_while_valid = False
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.stream:
                self.received.append(message.credentials)
        except grpc.aio.AioRpcError as error:
            self.ended = error.code()
            self.ended_while_valid = bool(self.received) and valid(self.received[-1])
        except asyncio.CancelledError:
            pass

    async def stop(self) -> None:
        self.stream.cancel()
        await self.task


async def first_credentials(watchers: list[StreamWatcher]) -> None:
    async with asyncio.timeout(20):
        while not all(w.received for w in watchers):
            await asyncio.sleep(0.05)


async def test_sts_down_runs_with_valid_credentials_do_not_notice(
    faulty: dict[str, Any],
    faults: FaultyAws,
    local_aws: LocalAws,
    tenant: str,
    broker_identity: Identity,
) -> None:
    lifetime, outage = 14.0, 5.0
    row = Row(
        "STS down",
        f"every AWS request reset for up to {outage:.0f} s; credentials live {lifetime:.0f} s",
    )
    async with start_broker(faulty | {"sts_max_concurrency": 4}, broker_identity) as running:
        stub = running.stub
        await connect(running, local_aws, tenant)
        local_aws.sts.session_lifetime = lifetime
        runs = [f"run-{i}" for i in range(20)]
        issued = [await stub.IssueCredentials(issue(tenant, run)) for run in runs]
        watchers = [
            StreamWatcher(
                stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id=r))
            )
            for r in runs
        ]
        await first_credentials(watchers)

        # STS goes down two seconds before the credentials' refresh point (half their life),
        # so renewals meet the outage, and comes back while they still have a few seconds left,
        # however long the set-up took: an outage running into their last second would rightly
        # leave runs without credentials (none are served that close to expiry).
        first_expiry = time.monotonic() + min(seconds_left(a.credentials) for a in issued)
        await asyncio.sleep(max(0.0, first_expiry - lifetime / 2 - 2.0 - time.monotonic()))
        faults.inject("down")
        outage_started = time.monotonic()
        outage_ends = min(outage_started + outage, first_expiry - 4.0)
        # On time, even while a batch of calls below is still waiting for STS.
        asyncio.get_running_loop().call_later(outage_ends - time.monotonic(), faults.clear)
        new_run_took = None
        while time.monotonic() < outage_ends:
            answers = await asyncio.gather(
                *(
                    valid_on_arrival(stub.IssueCredentials(issue(tenant, run), timeout=5))
                    for run in runs
                ),
                return_exceptions=True,
            )
            row.requests += len(answers)
            for answer in answers:
                if isinstance(answer, grpc.aio.AioRpcError):
                    row.failed(answer.code().name)
                    row.credentials_lost += 1
                else:
                    assert answer is True, "credentials expired when they arrived"
            if new_run_took is None:
                started = time.monotonic()
                row.requests += 1
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.IssueCredentials(issue(tenant, "newcomer"), timeout=15)
                new_run_took = time.monotonic() - started
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                row.failed("UNAVAILABLE (new run, expected)")
            await asyncio.sleep(0.2)
        outage_took = outage_ends - outage_started

        async with asyncio.timeout(lifetime):
            while not all(len(w.received) >= 2 for w in watchers):
                await asyncio.sleep(0.05)
        row.streams_dropped = sum(w.ended is not None for w in watchers)
        for watcher in watchers:
            await watcher.stop()
        stale = running.broker.cache.stats.stale_served
        failed_behind = running.broker.cache.stats.background_failures
    row.notes = (
        f"STS down {outage_took:.1f} s across the refresh point; {failed_behind} background "
        f"renewals failed while every call was answered from the cache, {stale} answers "
        f"served stale-while-error; a new run got UNAVAILABLE in {new_run_took:.1f} s; every "
        f"stream renewed after; at most {faults.most_in_flight} STS calls at once (bound 4)"
    )
    record(row)
    # The outage met calls past the advisory point: their renewals, in the background, failed.
    assert failed_behind + stale > 0, "the outage met IssueCredentials past the refresh point"
    assert new_run_took < 10
    assert faults.most_in_flight <= 4


async def test_throttling_is_retried_and_never_amplified(
    faulty: dict[str, Any],
    faults: FaultyAws,
    local_aws: LocalAws,
    tenant: str,
    broker_identity: Identity,
) -> None:
    row = Row("STS throttles", "Throttling: twice, then without end; 30 callers per run")
    async with start_broker(faulty, broker_identity) as running:
        await connect(running, local_aws, tenant)
        before = faults.requests["AssumeRole"]
        faults.inject("throttle", count=2)
        answers = await asyncio.gather(
            *(running.stub.IssueCredentials(issue(tenant, "retried")) for _ in range(30))
        )
        retried_calls = faults.requests["AssumeRole"] - before
        assert len({a.credentials.access_key_id for a in answers}) == 1
        row.requests += 30

        before = faults.requests["AssumeRole"]
        faults.inject("throttle")
        outcomes = await asyncio.gather(
            *(
                running.stub.IssueCredentials(issue(tenant, "refused"), timeout=30)
                for _ in range(30)
            ),
            return_exceptions=True,
        )
        refused_calls = faults.requests["AssumeRole"] - before
        row.requests += 30
        for outcome in outcomes:
            assert isinstance(outcome, grpc.aio.AioRpcError)
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE
            row.failed("UNAVAILABLE (new run, expected)")
    row.notes = (
        f"throttled twice: 30 callers served by {retried_calls} STS calls (botocore backoff); "
        f"throttled on: {refused_calls} STS calls for 30 callers"
    )
    record(row)
    assert retried_calls == 3
    assert refused_calls <= 3, "N callers of one run never make N calls"


async def test_slow_or_hanging_sts_never_hangs_a_caller(
    faulty: dict[str, Any],
    faults: FaultyAws,
    local_aws: LocalAws,
    tenant: str,
    broker_identity: Identity,
) -> None:
    row = Row("STS slow / hanging", "2 s latency; a hang of 4 s")
    async with start_broker(faulty | {"max_call_seconds": 2.0}, broker_identity) as running:
        await connect(running, local_aws, tenant)
        faults.inject("latency", seconds=2.0)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await running.stub.IssueCredentials(issue(tenant, "impatient"), timeout=0.5)
        answered = time.monotonic() - started
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        row.failed("DEADLINE_EXCEEDED (caller's deadline, expected)")
        async with asyncio.timeout(2):
            while running.broker.cache.in_flight:
                await asyncio.sleep(0.01)  # the STS call was abandoned with its last caller

        faults.inject("hang", seconds=4.0)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await running.stub.IssueCredentials(issue(tenant, "no-deadline"))
        cut_after = time.monotonic() - started
        assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        row.failed("DEADLINE_EXCEEDED (server's cap, expected)")
        row.requests = 2
    row.notes = (
        f"deadline 0.5 s answered in {answered:.2f} s and the STS call abandoned; "
        f"no deadline: cut at {cut_after:.1f} s (cap 2 s)"
    )
    record(row)
    assert answered < 1.5
    assert cut_after < 4


async def test_a_burst_of_new_runs_is_bounded_at_sts(
    faulty: dict[str, Any],
    faults: FaultyAws,
    local_aws: LocalAws,
    tenant: str,
    broker_identity: Identity,
) -> None:
    runs, bound = 100, 8
    row = Row("burst of new runs", f"{runs} new runs at once; STS answers in 100 ms")
    # The broker's bound, here the tenant's share too (test_quotas.py tests the share).
    async with start_broker(
        faulty | {"sts_max_concurrency": bound, "tenant_sts_concurrency": bound}, broker_identity
    ) as running:
        await connect(running, local_aws, tenant)
        leftover = faults.in_flight  # requests an earlier scenario left hanging
        faults.most_in_flight = 0
        faults.inject("latency", seconds=0.1)
        started = time.monotonic()
        answers = await asyncio.gather(
            *(running.stub.IssueCredentials(issue(tenant, f"burst-{i}")) for i in range(runs)),
            return_exceptions=True,
        )
        took = time.monotonic() - started
    row.requests = runs
    for answer in answers:
        if isinstance(answer, grpc.aio.AioRpcError):
            row.failed(answer.code().name)
    most = faults.most_in_flight - leftover
    row.notes = f"all served in {took:.1f} s with at most {most} STS calls at once (bound {bound})"
    record(row)
    assert not row.failures
    assert most <= bound


def serve_env(faulty: dict[str, Any], identity: Identity) -> dict[str, str]:
    return (
        os.environ
        | {f"BROKER_{k.upper()}": str(v) for k, v in faulty.items()}
        | {
            "AWS_ACCESS_KEY_ID": identity.access_key_id,
            "AWS_SECRET_ACCESS_KEY": identity.secret_access_key,
            "BROKER_SHUTDOWN_GRACE": "5",
            "BROKER_DRAIN_SECONDS": "0",
        }
    )


@pytest.fixture
async def served(
    faulty: dict[str, Any], broker_identity: Identity, tmp_path: Path
) -> AsyncIterator[Any]:
    """`start()` a `broker serve` process (again, on the same database); closed after."""
    started: list[tuple[BrokerProcess, grpc.aio.Channel]] = []

    def start() -> tuple[BrokerProcess, broker_pb2_grpc.CredentialBrokerStub]:
        process = BrokerProcess(
            ["serve"], serve_env(faulty, broker_identity), tmp_path / f"serve-{len(started)}.log"
        )
        port = process.wait_serving()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((process, channel))
        return process, broker_pb2_grpc.CredentialBrokerStub(channel)

    yield start
    for process, channel in started:
        await channel.close()
        process.close()


async def test_sigterm_finishes_calls_and_hands_streams_over(
    served: Any, faults: FaultyAws, local_aws: LocalAws, tenant: str
) -> None:
    row = Row("SIGTERM (rolling restart)", "SIGTERM with a call in flight (STS 1.5 s slow)")
    process, stub = served()
    created = await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    role_arn = local_aws.create_customer_stack(created.connection.quick_create_url)
    await stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))
    watcher = StreamWatcher(
        stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="w"))
    )
    await first_credentials([watcher])
    faults.inject("latency", seconds=1.5)
    in_flight = asyncio.ensure_future(stub.IssueCredentials(issue(tenant, "in-flight")))
    await asyncio.sleep(0.3)
    process.process.send_signal(signal.SIGTERM)
    answer = await in_flight
    row.requests = 2
    assert answer.credentials.access_key_id, "the in-flight call finished"
    await asyncio.wait_for(watcher.task, timeout=10)
    assert watcher.ended == grpc.StatusCode.UNAVAILABLE, "the launcher reconnects elsewhere"
    row.failed("UNAVAILABLE (stream handed over, expected)")
    assert process.process.wait(timeout=10) == 0
    row.notes = "in-flight IssueCredentials answered OK; the stream ended UNAVAILABLE; exit 0"
    record(row)


async def test_sigkill_mid_write_loses_nothing_acknowledged(
    served: Any, faults: FaultyAws, local_aws: LocalAws, tenant: str
) -> None:
    row = Row("SIGKILL mid-write", "kill -9 amid 60 CreateConnection and a VerifyRole")
    process, stub = served()
    created = await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    role_arn = local_aws.create_customer_stack(created.connection.quick_create_url)
    faults.inject("latency", seconds=1.0)
    verifying = asyncio.ensure_future(
        stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))
    )
    acknowledged: dict[str, str] = {}

    async def create(name: str) -> None:
        answer = await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=name))
        acknowledged[name] = answer.connection.external_id

    names = [f"{tenant}-c{i}" for i in range(60)]
    creating = [asyncio.create_task(create(n)) for n in names]
    async with asyncio.timeout(10):
        while len(acknowledged) < 10:
            await asyncio.sleep(0.001)
    process.process.send_signal(signal.SIGKILL)
    outcomes = await asyncio.gather(verifying, *creating, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, grpc.aio.AioRpcError):
            row.failed(f"{outcome.code().name} (cut by the kill, expected)")
    row.requests = 61
    faults.clear()

    _, again = served()
    for name in names:
        try:
            got = await again.GetConnection(pb.GetConnectionRequest(tenant_id=name))
        except grpc.aio.AioRpcError as error:
            missing = error
        else:
            missing = None
        if missing is not None:
            assert missing.code() == grpc.StatusCode.NOT_FOUND
            assert name not in acknowledged, "an acknowledged connection was lost"
            continue
        assert got.connection.status == pb.CONNECTION_STATUS_PENDING
        if name in acknowledged:
            assert got.connection.external_id == acknowledged[name]
    interrupted = await again.GetConnection(pb.GetConnectionRequest(tenant_id=tenant))
    assert interrupted.connection.status == pb.CONNECTION_STATUS_PENDING
    assert interrupted.connection.external_id == created.connection.external_id
    verified = await again.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))
    assert verified.connection.status == pb.CONNECTION_STATUS_ACTIVE
    row.notes = (
        f"{len(acknowledged)} creates acknowledged before the kill, all found after restart; "
        "the interrupted VerifyRole left PENDING and succeeded when retried"
    )
    record(row)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_soak_streams_and_traffic_through_renewals(
    faulty: dict[str, Any],
    faults: FaultyAws,
    local_aws: LocalAws,
    tenant: str,
    broker_identity: Identity,
) -> None:
    streams, runs, seconds, lifetime = 1000, 100, 12.0, 6.0
    row = Row("soak", f"none; {streams} streams on {runs} runs + IssueCredentials, {seconds:.0f} s")
    settings = faulty | {"cache_max_entries": 150}
    async with start_broker(settings, broker_identity) as running:
        await connect(running, local_aws, tenant)
        local_aws.sts.session_lifetime = lifetime
        tasks_before = len(asyncio.all_tasks())
        stubs = [broker_pb2_grpc.CredentialBrokerStub(running.channel)]
        watchers = [
            StreamWatcher(
                stubs[0].WatchCredentials(
                    pb.WatchCredentialsRequest(tenant_id=tenant, run_id=f"run-{i % runs}")
                )
            )
            for i in range(streams)
        ]
        await first_credentials(watchers)
        sts_before = faults.requests["AssumeRole"]
        rss: list[float] = []

        async def traffic() -> None:
            rng = random.Random(7)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                row.requests += 1
                try:
                    await running.stub.IssueCredentials(
                        issue(tenant, f"run-{rng.randrange(runs)}"), timeout=5
                    )
                except grpc.aio.AioRpcError as error:
                    row.failed(error.code().name)
                    row.credentials_lost += 1
                await asyncio.sleep(0.005)

        async def sample() -> None:
            for _ in range(int(seconds)):
                await asyncio.sleep(1)
                rss.append(rss_mib())
                assert len(running.broker.cache) <= 150

        await asyncio.gather(*(traffic() for _ in range(4)), sample())
        renewals = faults.requests["AssumeRole"] - sts_before
        row.streams_dropped = sum(w.ended is not None for w in watchers)
        rounds = min(len(w.received) for w in watchers) - 1
        for watcher in watchers:
            await watcher.stop()
        async with asyncio.timeout(5):
            while len(running.broker.hub) or len(asyncio.all_tasks()) > tasks_before:
                await asyncio.sleep(0.05)
    growth = max(rss[len(rss) // 2 :]) - rss[len(rss) // 4]
    row.notes = (
        f"{rounds}+ renewal rounds per stream, {renewals} STS calls for {runs} runs; cache "
        f"≤ 150; RSS {rss[len(rss) // 4]:.0f} → {max(rss):.0f} MiB; no task left after"
    )
    record(row)
    assert rounds >= 2
    assert growth < 40, rss
