"""Two broker processes on one PostgreSQL agree: a Disconnect on one ends the other's streams and
stops its issuing within a second, and a lost notification is made up for by the re-check."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from broker.connections import GRANT_FRESH_SECONDS
from broker.emulator import Identity, LocalAws
from broker.models import Status
from broker.store import open_store
from broker.store.postgres import LISTENER_NAME
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc
from tests.conftest import connect, settings_for, start_broker
from tests.processes import BrokerProcess

RECHECK_INTERVAL = 2.0


class Replica(BrokerProcess):
    def __init__(self, name: str, env: dict[str, str], folder: Path) -> None:
        super().__init__(["serve"], env, folder / f"{name}.log")
        port = self.wait_serving()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = broker_pb2_grpc.CredentialBrokerStub(self.channel)


@pytest.fixture
def replica_env(
    postgres_url: str, local_aws: LocalAws, broker_identity: Identity, template_url: str
) -> dict[str, str]:
    return os.environ | {
        "BROKER_LISTEN": "127.0.0.1:0",
        "BROKER_DATABASE_URL": postgres_url,
        "BROKER_AWS_ENDPOINT_URL": local_aws.endpoint_url,
        "BROKER_TEMPLATE_URL": template_url,
        "BROKER_RECHECK_INTERVAL": str(RECHECK_INTERVAL),
        "BROKER_METRICS_LISTEN": "127.0.0.1:0",
        "AWS_ACCESS_KEY_ID": broker_identity.access_key_id,
        "AWS_SECRET_ACCESS_KEY": broker_identity.secret_access_key,
    }


@pytest.fixture
async def replicas(replica_env: dict[str, str], tmp_path: Path) -> AsyncIterator[list[Replica]]:
    started = [Replica(name, replica_env, tmp_path) for name in ("a", "b")]
    yield started
    for replica in started:
        await replica.channel.close()
        replica.close()


async def connect_via(replica: Replica, local_aws: LocalAws, tenant: str) -> None:
    created = await replica.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    role_arn = local_aws.create_customer_stack(created.connection.quick_create_url)
    await replica.stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))


async def stream_end(stream: Any, within: float) -> tuple[grpc.StatusCode, float]:
    """Read until the stream ends; its code and when it ended (monotonic)."""
    async with asyncio.timeout(within):
        try:
            while True:
                await stream.read()
        except grpc.aio.AioRpcError as ended:
            return ended.code(), time.monotonic()


async def test_disconnect_on_one_replica_reaches_the_other_within_a_second(
    replicas: list[Replica], local_aws: LocalAws, tenant: str
) -> None:
    a, b = replicas
    await connect_via(a, local_aws, tenant)
    issue = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="cached-on-b")
    await b.stub.IssueCredentials(issue)
    stream = b.stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="w"))
    await stream.read()

    ending = asyncio.create_task(stream_end(stream, within=10))
    await asyncio.sleep(0.2)
    sent = time.monotonic()
    await a.stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
    code, ended_at = await ending
    took = ended_at - sent
    print(f"disconnect on replica a ended replica b's stream after {took * 1000:.0f} ms")
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert took < 1.0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await b.stub.IssueCredentials(issue)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_lost_notification_is_made_up_for(
    replicas: list[Replica], local_aws: LocalAws, tenant: str, postgres_url: str
) -> None:
    a, b = replicas
    await connect_via(a, local_aws, tenant)
    stream = b.stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="w"))
    await stream.read()
    database = postgres_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(postgres_url.rsplit("/", 1)[0] + "/postgres")
    try:
        # Cut every replica's listening connection and keep it from coming back, then
        # disconnect while they are deaf: only the periodic re-check can tell replica b.
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        killed = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = $2",
            LISTENER_NAME,
            database,
        )
        assert len(killed) == 2
        await a.stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
        sent = time.monotonic()
        code, ended_at = await stream_end(stream, within=RECHECK_INTERVAL + 10)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        print(f"after a lost notification, replica b converged in {ended_at - sent:.2f} s")
        assert ended_at - sent < RECHECK_INTERVAL + 1.0
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    # The listener comes back by itself (and re-checks every tenant it holds).
    b.wait_for(r'(?s)not listening for changes; retrying.*listening for changes["\n]', timeout=15)


async def test_a_change_nobody_announced_stops_issuing_within_a_second(
    local_aws: LocalAws,
    broker_identity: Identity,
    template_url: str,
    tmp_path: Path,
    tenant: str,
) -> None:
    """IssueCredentials trusts a grant it read for GRANT_FRESH_SECONDS. A disconnect written by
    another writer, with no notification at all (SQLite has none), is seen within that."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    async with start_broker(settings_for(url, local_aws, template_url), broker_identity) as running:
        await connect(running, local_aws, tenant)
        issue = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r")
        await running.stub.IssueCredentials(issue)
        other = await open_store(url)
        try:
            current = await other.get(tenant)
            assert current is not None
            await other.save(
                replace(current, status=Status.DISCONNECTED, disconnected_at=datetime.now(UTC)),
                new_external_id=False,
            )
        finally:
            await other.close()
        written = time.monotonic()
        answers: list[grpc.StatusCode] = []
        while not answers or answers[-1] == grpc.StatusCode.OK:
            assert time.monotonic() - written < GRANT_FRESH_SECONDS + 0.5, answers
            try:
                await running.stub.IssueCredentials(issue)
                answers.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as refused:
                answers.append(refused.code())
            await asyncio.sleep(0.05)
        assert answers[-1] == grpc.StatusCode.FAILED_PRECONDITION
