"""Connection lifecycle rules (DESIGN.md), through gRPC."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from broker.emulator import LocalAws
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running, connect


async def test_concurrent_creates_agree_on_one_external_id(running: Running, tenant: str) -> None:
    request = pb.CreateConnectionRequest(tenant_id=tenant)
    answers = await asyncio.gather(*(running.stub.CreateConnection(request) for _ in range(20)))
    assert len({a.connection.external_id for a in answers}) == 1


async def test_region_picks_the_console_of_the_link(running: Running, tenant: str) -> None:
    created = await running.stub.CreateConnection(
        pb.CreateConnectionRequest(tenant_id=tenant, region="eu-west-1")
    )
    url = urlsplit(created.connection.quick_create_url)
    assert parse_qs(url.query)["region"] == ["eu-west-1"]
    assert created.connection.region == "eu-west-1"
    moved = await running.stub.CreateConnection(
        pb.CreateConnectionRequest(tenant_id=tenant, region="cn-north-1")
    )
    assert moved.connection.external_id == created.connection.external_id
    assert moved.connection.quick_create_url.startswith("https://console.amazonaws.cn/")


async def test_disconnected_tenant_cannot_verify_and_disconnect_is_idempotent(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    connection = await connect(running, local_aws, tenant)
    first = await running.stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
    second = await running.stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
    assert first.connection.disconnected_at == second.connection.disconnected_at
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.VerifyRole(
            pb.VerifyRoleRequest(tenant_id=tenant, role_arn=connection.role_arn)
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CreateConnection" in (refused.value.details() or "")


async def test_reconnecting_needs_the_new_external_id_in_the_role(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    """After Disconnect the old role (old external ID) no longer verifies: never reused."""
    old = await connect(running, local_aws, tenant)
    await running.stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
    await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=old.role_arn))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_reverify_of_an_active_connection_keeps_credentials(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    connection = await connect(running, local_aws, tenant)
    request = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r")
    before = await running.stub.IssueCredentials(request)
    again = await running.stub.VerifyRole(
        pb.VerifyRoleRequest(tenant_id=tenant, role_arn=connection.role_arn)
    )
    assert again.connection.status == pb.CONNECTION_STATUS_ACTIVE
    after = await running.stub.IssueCredentials(request)
    assert after.credentials.access_key_id == before.credentials.access_key_id


async def test_connections_survive_a_restart(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    from broker.store import open_store

    connection = await connect(running, local_aws, tenant)
    store = await open_store(running.database_url)
    try:
        stored = await store.get(tenant)
    finally:
        await store.close()
    assert stored is not None
    assert stored.role_arn == connection.role_arn
    assert stored.external_id == connection.external_id
    assert [c.name for c in stored.checks] == [c.name for c in connection.checks]
