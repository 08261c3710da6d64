"""WatchCredentials over real gRPC, with the emulator handing out short-lived credentials so
renewals happen within the test."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import Running, connect, start_broker

LIFETIME = 3.0  # seconds the emulator's credentials live in these tests


async def test_stream_renews_before_each_expiry(
    local_aws: LocalAws,
    tenant: str,
    broker_settings: dict[str, Any],
    broker_identity: Identity,
) -> None:
    async with start_broker(broker_settings | {"refresh_margin": 60}, broker_identity) as running:
        await connect(running, local_aws, tenant)
        local_aws.sts.session_lifetime = LIFETIME
        stream = running.stub.WatchCredentials(
            pb.WatchCredentialsRequest(tenant_id=tenant, run_id="long-run")
        )
        seen = []
        started = time.monotonic()
        for _ in range(4):
            message = await asyncio.wait_for(stream.read(), timeout=LIFETIME * 2)
            credentials = message.credentials
            left = credentials.expiration.ToDatetime().timestamp() - time.time()
            assert left > 0.5, "every credential arrives with time left to use it"
            seen.append(credentials.access_key_id)
        elapsed = time.monotonic() - started
        stream.cancel()
    assert len(set(seen)) == 4
    # Three renewals, each around half-way through a 3 s life, not in a tight loop.
    assert elapsed > 3 * LIFETIME * 0.4, elapsed


async def test_role_change_reaches_open_streams_at_once(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    connection = await connect(running, local_aws, tenant)
    stream = running.stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="r"))
    old = (await stream.read()).credentials
    url = connection.quick_create_url.replace("stackName=credential-broker-", "stackName=moved-")
    new_role = local_aws.create_customer_stack(url)
    await running.stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=new_role))
    new = (await asyncio.wait_for(stream.read(), timeout=5)).credentials
    assert new.access_key_id != old.access_key_id
    assert new_role.rsplit("/", 1)[1] in new.assumed_role_arn
    stream.cancel()


async def test_shutdown_goes_not_serving_and_ends_streams_unavailable(
    local_aws: LocalAws, tenant: str, broker_settings: dict[str, Any], broker_identity: Identity
) -> None:
    async with start_broker(broker_settings, broker_identity) as running:
        await connect(running, local_aws, tenant)
        health = health_pb2_grpc.HealthStub(running.channel).Watch(
            health_pb2.HealthCheckRequest(service="broker.v1.CredentialBroker")
        )
        assert (await health.read()).status == health_pb2.HealthCheckResponse.SERVING
        stream = running.stub.WatchCredentials(
            pb.WatchCredentialsRequest(tenant_id=tenant, run_id="r")
        )
        await stream.read()
        stopping = asyncio.create_task(running.broker.stop(grace=2))
        assert (await health.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await stream.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (ended.value.details() or "")
        await stopping
        assert len(running.broker.hub) == 0


async def test_cancelled_stream_leaves_nothing_behind(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    await connect(running, local_aws, tenant)
    streams = [
        running.stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id=f"r{i}"))
        for i in range(20)
    ]
    await asyncio.gather(*(s.read() for s in streams))
    assert len(running.broker.hub) == 20
    for stream in streams:
        stream.cancel()
    for _ in range(50):
        if len(running.broker.hub) == 0:
            break
        await asyncio.sleep(0.05)
    assert len(running.broker.hub) == 0


async def test_every_call_is_one_log_line_with_its_code(
    running: Running, local_aws: LocalAws, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    await connect(running, local_aws, tenant)
    stream = running.stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="r"))
    await stream.read()
    caplog.set_level("INFO", logger="broker.service")
    stream.cancel()
    for _ in range(50):
        if any(getattr(r, "method", "") == "WatchCredentials" for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    with pytest.raises(grpc.aio.AioRpcError):
        await running.stub.GetConnection(pb.GetConnectionRequest(tenant_id="no-such-tenant"))
    lines = [(r.method, r.code) for r in caplog.records if r.name == "broker.service"]  # type: ignore[attr-defined]
    assert lines == [("WatchCredentials", "CANCELLED"), ("GetConnection", "NOT_FOUND")]
    watch_line = next(r for r in caplog.records if getattr(r, "method", "") == "WatchCredentials")
    assert watch_line.messages == 1  # type: ignore[attr-defined]
    assert watch_line.tenant == tenant  # type: ignore[attr-defined]


async def test_health_alone_on_a_plaintext_port_for_probes(
    broker_settings: dict[str, Any], broker_identity: Identity
) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = broker_settings | {"health_listen": f"127.0.0.1:{port}"}
    async with (
        start_broker(settings, broker_identity) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        broker_stub = pb_grpc.CredentialBrokerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as only_health:
            await broker_stub.GetConnection(pb.GetConnectionRequest(tenant_id="acme"))
        assert only_health.value.code() == grpc.StatusCode.UNIMPLEMENTED
        watching = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watching.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(running.broker.stop(grace=1))
        assert (await watching.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping
