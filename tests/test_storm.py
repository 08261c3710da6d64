"""A reconnect storm: when a replica goes away, all its launchers reconnect at once. Every
stream opened at once must get its credentials; none may be dropped by the server's queue
(with gRPC core's default of 1,000 pending calls, or a lower BROKER_MAX_PENDING_REQUESTS, most
of these come back CANCELLED)."""

from __future__ import annotations

import asyncio
import time

import grpc

from broker.emulator import LocalAws
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc
from tests.conftest import Running, connect

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
