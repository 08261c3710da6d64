"""The drain on SIGTERM, against real `broker serve` processes and real gRPC clients.

Health turns NOT_SERVING first (on the gRPC port and on BROKER_HEALTH_LISTEN); every RPC is
served as before for BROKER_DRAIN_SECONDS, new streams included; then the server stops
accepting (new calls fail UNAVAILABLE: connection refused), open streams end UNAVAILABLE so
launchers reconnect to another replica, and calls in flight get BROKER_SHUTDOWN_GRACE. A second
SIGTERM or SIGINT cuts the drain short, not the grace. No call ends CANCELLED for the broker's
doing; what gRPC core itself cancels, at the instant the server stops, is shown and bounded."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.client import BrokerClient
from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc
from tests.processes import BrokerProcess
from tests.test_cli import Dev

SERVICE = "broker.v1.CredentialBroker"
TICK = 0.005  # one new IssueCredentials call this often, through the whole shutdown
# Time for a signal to reach the broker's loop and a call to cross loopback, at either end of
# the drain: a call sent this close to the drain's end may meet a server that stopped.
SLACK = 0.3
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Served:
    """A `broker serve` process, its gRPC port and its health port (BROKER_HEALTH_LISTEN)."""

    process: BrokerProcess
    port: int
    health_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> float:
        """Send `sig`; when it was sent (monotonic)."""
        sent = time.monotonic()
        self.process.process.send_signal(sig)
        return sent

    async def exit_code(self, within: float) -> int:
        return await asyncio.to_thread(self.process.process.wait, within)


@pytest.fixture
def serve_env(
    local_aws: LocalAws, broker_identity: Identity, template_url: str, tmp_path: Path
) -> dict[str, str]:
    return os.environ | {
        "BROKER_LISTEN": "127.0.0.1:0",
        "BROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'broker.db'}",
        "BROKER_AWS_ENDPOINT_URL": local_aws.endpoint_url,
        "BROKER_TEMPLATE_URL": template_url,
        "BROKER_METRICS_LISTEN": "off",
        "AWS_ACCESS_KEY_ID": broker_identity.access_key_id,
        "AWS_SECRET_ACCESS_KEY": broker_identity.secret_access_key,
    }


@pytest.fixture
def serve(serve_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """`serve(drain=…, grace=…)` starts a broker process; every one is killed after the test."""
    started: list[Served] = []

    def start(*, drain: float, grace: float, **env: str) -> Served:
        health_port = free_port()
        process = BrokerProcess(
            ["serve"],
            serve_env
            | {
                "BROKER_DRAIN_SECONDS": str(drain),
                "BROKER_SHUTDOWN_GRACE": str(grace),
                "BROKER_HEALTH_LISTEN": f"127.0.0.1:{health_port}",
            }
            | env,
            tmp_path / f"serve-{len(started)}.log",
        )
        served = Served(process, 0, health_port)
        started.append(served)
        served.port = process.wait_serving()
        return served

    yield start
    for served in started:
        served.process.close()


async def connected(stub: broker_pb2_grpc.CredentialBrokerStub, aws: LocalAws, tenant: str) -> None:
    created = await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    role_arn = aws.create_customer_stack(created.connection.quick_create_url)
    await stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))


@dataclass
class Call:
    sent: float
    code: grpc.StatusCode
    details: str


async def fire(
    stub: broker_pb2_grpc.CredentialBrokerStub, tenant: str, until: float, calls: list[Call]
) -> None:
    """A new IssueCredentials call every TICK until `until` (monotonic), each recorded with
    how it ended; none waits for another."""

    async def one(sent: float) -> None:
        request = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run-1")
        try:
            await stub.IssueCredentials(request, timeout=10)
        except grpc.aio.AioRpcError as error:
            calls.append(Call(sent, error.code(), error.details() or ""))
        else:
            calls.append(Call(sent, OK, ""))

    running = []
    while (now := time.monotonic()) < until:
        running.append(asyncio.create_task(one(now)))
        await asyncio.sleep(TICK)
    await asyncio.gather(*running)


async def poll_health(target: str, until: float, seen: list[tuple[float, str]]) -> None:
    """grpc.health.v1 Check of the broker's service every 20 ms: (when, status or code)."""
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        while (now := time.monotonic()) < until:
            try:
                answer = await health.Check(request, timeout=1)
                seen.append((now, health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)))
            except grpc.aio.AioRpcError as error:
                seen.append((now, error.code().name))
            await asyncio.sleep(0.02)


def first(seen: list[tuple[float, str]], status: str) -> float:
    return next(when for when, what in seen if what == status)


def refused(call: Call) -> bool:
    """Failed because nothing listens any more: the channel could not connect."""
    return call.code == UNAVAILABLE and "Connection refused" in call.details


async def test_sigterm_serves_through_the_drain_then_refuses(
    serve: Any, local_aws: LocalAws, tenant: str
) -> None:
    """One caller on one connection, firing without pause across the whole shutdown."""
    drain = 2.0
    served = serve(drain=drain, grace=5)
    async with grpc.aio.insecure_channel(served.target) as channel:
        stub = broker_pb2_grpc.CredentialBrokerStub(channel)
        await connected(stub, local_aws, tenant)
        await stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run-1"))
        calls: list[Call] = []
        probed: list[tuple[float, str]] = []  # the kubelet's view: BROKER_HEALTH_LISTEN
        on_grpc_port: list[tuple[float, str]] = []  # a load balancer's view: the gRPC port
        until = time.monotonic() + 0.3 + drain + 1.2
        firing = asyncio.create_task(fire(stub, tenant, until, calls))
        polling = [
            asyncio.create_task(poll_health(f"127.0.0.1:{served.health_port}", until, probed)),
            asyncio.create_task(poll_health(served.target, until, on_grpc_port)),
        ]
        await asyncio.sleep(0.3)
        signalled = served.signal()
        await asyncio.gather(firing, *polling)
    assert await served.exit_code(within=10) == 0
    stop = signalled + drain  # when the server stopped accepting, give or take SLACK

    codes = Counter(call.code.name for call in calls)
    print(f"\n{len(calls)} calls, one every {TICK * 1000:g} ms, across the shutdown: {dict(codes)}")
    # Health turned NOT_SERVING at once, on both ports, while every call was still answered.
    not_serving = max(first(probed, "NOT_SERVING"), first(on_grpc_port, "NOT_SERVING"))
    assert not_serving - signalled < SLACK
    during = [c for c in calls if not_serving <= c.sent < stop - SLACK]
    assert len(during) > (drain - 2 * SLACK) / TICK / 3, "calls went on during the drain"
    assert all(c.code == OK for c in during), Counter(c.code.name for c in during)
    assert all(c.code == OK for c in calls if c.sent < stop - SLACK)
    # Then the server stopped accepting: every later call was refused, none cancelled.
    after = [c for c in calls if c.sent > stop + SLACK]
    assert len(after) > 100
    assert all(refused(c) for c in after), Counter((c.code.name, c.details) for c in after)
    assert first(probed, "UNAVAILABLE") > stop - SLACK
    # The one exception is gRPC core's, not the broker's: a call that reaches the server in the
    # instant after it stopped accepting, before this client has read the GOAWAY, is ended
    # CANCELLED (grpc/grpc#41785). Only a call sent at that instant may be; callers that follow
    # health are off the replica by then (next test).
    cancelled = [c for c in calls if c.code == grpc.StatusCode.CANCELLED]
    assert all(abs(c.sent - stop) <= SLACK for c in cancelled)
    assert len(cancelled) <= 2, codes


async def test_a_caller_that_follows_health_sees_no_error_while_a_replica_drains(
    serve: Any, postgres_url: str, local_aws: LocalAws, tenant: str
) -> None:
    """Two replicas; the caller balances over both and leaves one that says NOT_SERVING (as
    a load balancer or a mesh does): every call fired across a replica's shutdown is OK."""
    drain = 2.0
    a = serve(drain=drain, grace=1, BROKER_DATABASE_URL=postgres_url)
    b = serve(drain=0, grace=1, BROKER_DATABASE_URL=postgres_url)
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE},
    }
    options = [("grpc.service_config", json.dumps(config))]
    target = f"ipv4:{a.target},{b.target}"
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = broker_pb2_grpc.CredentialBrokerStub(channel)
        await connected(stub, local_aws, tenant)
        for _ in range(4):  # both replicas hold the run's credentials
            await stub.IssueCredentials(
                pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run-1"), wait_for_ready=True
            )
        calls: list[Call] = []
        until = time.monotonic() + 0.3 + drain + 2.0
        firing = asyncio.create_task(fire(stub, tenant, until, calls))
        await asyncio.sleep(0.3)
        signalled = a.signal()
        await firing
    assert await a.exit_code(within=10) == 0
    codes = Counter(call.code.name for call in calls)
    print(f"\n{len(calls)} calls across replica A's shutdown: {dict(codes)}")
    assert codes == {"OK": len(calls)}, codes
    assert [c for c in calls if c.sent > signalled + drain + SLACK], "fired past A's stop"
    # A did drain: it stopped accepting `drain` seconds after the signal, not at once.
    log = a.process.text()
    assert logged_at(log, "stopped accepting calls") - logged_at(log, "draining") >= drain - 0.05


def logged_at(log: str, message: str) -> float:
    """When the broker logged `message` (seconds since the epoch, from its JSON line)."""
    for line in log.splitlines():
        if line.startswith("{") and json.loads(line).get("message") == message:
            return datetime.fromisoformat(json.loads(line)["time"]).timestamp()
    raise AssertionError(f"never logged {message!r}:\n{log}")


async def test_streams_run_through_the_drain_then_move_to_another_replica(
    serve: Any, postgres_url: str, local_aws: LocalAws, tenant: str
) -> None:
    """Open streams, and streams opened during the drain, are served until its end; then they
    end UNAVAILABLE and the client reopens them on the other replica."""
    drain = 2.0
    a = serve(drain=drain, grace=5, BROKER_DATABASE_URL=postgres_url)
    b = serve(drain=0, grace=1, BROKER_DATABASE_URL=postgres_url)
    async with (
        grpc.aio.insecure_channel(a.target) as to_a,
        BrokerClient(f"ipv4:{a.target},{b.target}", reconnect_backoff=(0.05, 0.2)) as client,
    ):
        stub = broker_pb2_grpc.CredentialBrokerStub(to_a)
        await connected(stub, local_aws, tenant)
        before = stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="old"))
        await before.read()
        seen: list[tuple[float, str]] = []

        async def watch() -> None:
            async for credentials in client.watch_credentials(tenant, "run-1"):
                seen.append((time.monotonic(), credentials.access_key_id))

        watching = asyncio.create_task(watch())
        async with asyncio.timeout(10):
            while not seen:
                await asyncio.sleep(0.02)
        signalled = a.signal()
        await asyncio.sleep(0.5)
        # A new stream during the drain: accepted, and answered at once.
        during = stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="new"))
        first_message = await asyncio.wait_for(during.read(), timeout=5)
        assert first_message.credentials.access_key_id
        ended = {}
        for name, stream in (("before", before), ("during", during)):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await asyncio.wait_for(stream.read(), timeout=drain + 5)
            ended[name] = (error.value.code(), time.monotonic() - signalled)
        async with asyncio.timeout(10):
            while len(seen) < 2:
                await asyncio.sleep(0.02)
        watching.cancel()
    assert await a.exit_code(within=10) == 0
    for name, (code, after) in ended.items():
        assert code == UNAVAILABLE, name
        assert drain - SLACK <= after <= drain + 2, (name, after)
    # The client's watch went on from the other replica (its own, new STS session), unbroken.
    assert len(seen) == 2
    assert seen[1][1] != seen[0][1]
    assert seen[1][0] - signalled < drain + 2


async def test_a_second_signal_ends_the_drain_but_not_the_grace(
    serve: Any, local_aws: LocalAws, tenant: str
) -> None:
    """An operator's second Ctrl-C: the server stops accepting at once, the call in flight
    still finishes, and the process exits long before the drain would have ended."""
    served = serve(drain=30, grace=5)
    async with grpc.aio.insecure_channel(served.target) as channel:
        stub = broker_pb2_grpc.CredentialBrokerStub(channel)
        await connected(stub, local_aws, tenant)
        stream = stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="w"))
        await stream.read()
        signalled = served.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        local_aws.sts.latency = 1.5  # a run's first credentials now take 1.5 s to mint
        in_flight = asyncio.ensure_future(
            stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="slow"))
        )
        await asyncio.sleep(0.3)
        again = served.signal(signal.SIGINT)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(stream.read(), timeout=5)
        stream_ended = time.monotonic() - again
        answer = await asyncio.wait_for(in_flight, timeout=5)
        assert await served.exit_code(within=10) == 0
        exited = time.monotonic() - signalled
    assert ended.value.code() == UNAVAILABLE
    assert stream_ended < 1.0
    assert answer.credentials.access_key_id, "the call in flight got its grace"
    assert exited < 5, exited
    assert "second signal" in served.process.text()


def test_dev_does_not_drain_unless_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`broker dev` is one local process: Ctrl-C stops it at once, and its banner says so."""
    monkeypatch.delenv("BROKER_DRAIN_SECONDS", raising=False)
    dev = Dev(tmp_path)
    try:
        assert re.search(r"drain on Ctrl-C/SIGTERM: +0 s", dev.text()), dev.text()
        started = time.monotonic()
        assert dev.stop() == 0
        assert time.monotonic() - started < 3
    finally:
        dev.close()
    monkeypatch.setenv("BROKER_DRAIN_SECONDS", "1.5")
    (tmp_path / "told").mkdir()
    told = Dev(tmp_path / "told")
    try:
        assert re.search(r"drain on Ctrl-C/SIGTERM: +1.5 s", told.text()), told.text()
        started = time.monotonic()
        assert told.stop() == 0
        assert time.monotonic() - started >= 1.5
    finally:
        told.close()


async def test_streams_opened_across_the_stop_end_unavailable_not_at_the_grace(
    serve: Any, local_aws: LocalAws, tenant: str
) -> None:
    """A stream the server accepted just before it stopped accepting subscribes a moment
    later: it is ended UNAVAILABLE too, rather than held until the grace runs out."""
    drain, grace = 1.0, 8.0
    served = serve(drain=drain, grace=grace)
    async with grpc.aio.insecure_channel(served.target) as channel:
        stub = broker_pb2_grpc.CredentialBrokerStub(channel)
        await connected(stub, local_aws, tenant)
        ended: list[str] = []
        cancelled_opened_at: list[float] = []

        async def one(n: int) -> None:
            request = pb.WatchCredentialsRequest(tenant_id=tenant, run_id=f"r{n % 20}")
            opened_at = time.monotonic()
            try:
                async for _ in stub.WatchCredentials(request, timeout=grace + 5):
                    pass
            except grpc.aio.AioRpcError as error:
                ended.append(error.code().name)
                if error.code() == grpc.StatusCode.CANCELLED:
                    cancelled_opened_at.append(opened_at)

        opened: list[asyncio.Task[None]] = []
        until = time.monotonic() + 0.3 + drain + 0.5
        signalled = 0.0
        while time.monotonic() < until:
            opened.append(asyncio.create_task(one(len(opened))))
            if not signalled and time.monotonic() > until - drain - 0.5:
                signalled = served.signal()
            await asyncio.sleep(TICK)
        await asyncio.gather(*opened)
        assert await served.exit_code(within=grace + 5) == 0
        exited = time.monotonic() - signalled
    codes = Counter(ended)
    print(f"\n{len(ended)} streams across the shutdown: {dict(codes)}; exit after {exited:.2f} s")
    assert exited < drain + grace / 2, "no stream was held to the grace's end"
    assert set(codes) <= {"UNAVAILABLE", "CANCELLED"}, codes
    # gRPC core's instant, as in the first test: only a stream opened as the server stopped
    # accepting may be CANCELLED. (How many depends on the machine's load: a clean-clone CI
    # run saw 8 of 309 streams, opened 5 ms apart, in that instant.)
    stop = signalled + drain
    assert all(abs(at - stop) <= SLACK for at in cancelled_opened_at), (codes, stop)
