"""A reconnect storm: when a replica goes away, all its launchers reconnect at once. Every
stream opened at once must get its credentials; none may be dropped by the server's queue
(with gRPC core's default of 1,000 pending calls, or a lower BROKER_MAX_PENDING_REQUESTS, most
of these come back CANCELLED)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import grpc
import pytest

from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc
from tests.conftest import Running, connect, start_broker

STREAMS = 1000
RUNS = 50  # many streams per run, as when several sandboxes of a run reconnect


async def test_a_thousand_streams_opened_at_once_all_get_credentials(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    await connect(running, local_aws, tenant)
    channels = [grpc.aio.insecure_channel(running.address) for _ in range(4)]
    stubs = [broker_pb2_grpc.CredentialBrokerStub(c) for c in channels]
    started = time.monotonic()
    streams = [
        stubs[i % len(stubs)].WatchCredentials(
            pb.WatchCredentialsRequest(tenant_id=tenant, run_id=f"run-{i % RUNS}")
        )
        for i in range(STREAMS)
    ]
    firsts = await asyncio.wait_for(
        asyncio.gather(*(s.read() for s in streams), return_exceptions=True), timeout=120
    )
    elapsed = time.monotonic() - started
    failures = [f for f in firsts if not isinstance(f, pb.WatchCredentialsResponse)]
    assert not failures, f"{len(failures)} of {STREAMS} failed, e.g. {failures[0]!r}"
    assert len(running.broker.hub) == STREAMS
    assert len(running.broker.cache) == RUNS, "one STS session per run, not per stream"
    for stream in streams:
        stream.cancel()
    for channel in channels:
        await channel.close()
    print(f"{STREAMS} streams opened at once: all served in {elapsed:.2f}s")


@pytest.mark.parametrize(("bound", "cancelled"), [(1, True), (10, False)])
async def test_a_call_waits_in_core_queue_as_long_as_max_pending_seconds(
    broker_settings: dict[str, Any], broker_identity: Identity, bound: int, cancelled: bool
) -> None:
    """While the server's event loop is busy (here: blocked for 3 s, as a storm's AssumeRole
    work keeps it), calls queue in gRPC core; core cancels those queued longer than
    BROKER_MAX_PENDING_SECONDS. Its default is well above gRPC core's own 30 s, under which
    a 10,000-stream storm lost its tail (docs/benchmarks.md)."""
    overrides = dict(broker_settings, max_pending_seconds=bound)
    async with start_broker(overrides, broker_identity) as started:
        with grpc.insecure_channel(started.address) as channel:
            stub = broker_pb2_grpc.CredentialBrokerStub(channel)
            request = pb.GetConnectionRequest(tenant_id="nobody-here")
            with pytest.raises(grpc.RpcError) as first:  # the channel is up before the wait
                await asyncio.to_thread(stub.GetConnection, request, timeout=10)
            assert first.value.code() == grpc.StatusCode.NOT_FOUND
            calls = [stub.GetConnection.future(request, timeout=30) for _ in range(20)]
            time.sleep(3)  # noqa: ASYNC251 - the broker's loop is busy on purpose

            def outcomes() -> list[grpc.StatusCode]:
                """Each call's code (every one fails: NOT_FOUND, or CANCELLED in the queue)."""
                return [call.exception().code() for call in calls]  # type: ignore[union-attr]

            codes = await asyncio.to_thread(outcomes)
    queued_out = codes.count(grpc.StatusCode.CANCELLED)
    assert set(codes) <= {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED}
    if cancelled:
        assert queued_out >= 10, f"queued past {bound} s, yet answered: {codes}"
    else:
        assert queued_out == 0, f"{queued_out} of 20 cancelled while queued under {bound} s"


async def test_a_unary_call_is_not_queued_behind_a_storm_of_streams(
    broker_settings: dict[str, Any], broker_identity: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    """A reconnect storm's streams wait in gRPC core's queue of their own method: a call of
    another method sent after them (a Disconnect, an IssueCredentials, a health check) is
    taken among the first, not after all of them. While the broker's loop is busy, 300
    WatchCredentials are queued, then one GetConnection; the order in which the broker
    took them is the order of the request ids it made for them (each is answered NOT_FOUND;
    the store's read timeout is raised, so 300 reads at once on PostgreSQL are not
    UNAVAILABLE)."""
    caplog.set_level(logging.INFO, logger="broker.service")
    overrides = dict(broker_settings, store_read_timeout=10.0)
    async with start_broker(overrides, broker_identity) as running:
        with grpc.insecure_channel(running.address) as channel:
            stub = broker_pb2_grpc.CredentialBrokerStub(channel)
            unknown = pb.GetConnectionRequest(tenant_id="nobody-here")
            with pytest.raises(grpc.RpcError):  # the connection is up before the loop is held
                await asyncio.to_thread(stub.GetConnection, unknown, timeout=10)
            caplog.clear()
            watch = pb.WatchCredentialsRequest(tenant_id="nobody-here", run_id="r")
            streams = [stub.WatchCredentials(watch, timeout=60) for _ in range(300)]
            late = stub.GetConnection.future(unknown, timeout=60)
            time.sleep(2)  # noqa: ASYNC251 - the broker's loop is busy on purpose

            def ended() -> list[grpc.StatusCode]:
                codes = []
                for stream in streams:
                    with contextlib.suppress(grpc.RpcError):
                        list(stream)
                    codes.append(stream.code())
                return [*codes, late.exception().code()]  # type: ignore[union-attr]

            codes = await asyncio.to_thread(ended)
    assert set(codes) == {grpc.StatusCode.NOT_FOUND}
    # The order the broker took them in: the request ids it made, counted up as each call
    # began (they end in any order, waiting on the store).
    began = {
        int(str(getattr(r, "request_id", "")).rpartition("-")[2], 16): getattr(r, "method", None)
        for r in caplog.records
        if r.name == "broker.service"
    }
    order = [began[number] for number in sorted(began)]
    assert order.count("WatchCredentials") == 300
    place = order.index("GetConnection")
    assert place < 150, f"the GetConnection was taken {place + 1}th of 301, behind the streams"
