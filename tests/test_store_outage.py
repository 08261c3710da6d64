"""PostgreSQL goes down under a running broker: runs already cached keep their credentials and
streams, RPCs that need the store answer UNAVAILABLE at once, and the broker recovers by itself
when PostgreSQL is back. The server is really stopped (pg_ctlcluster), so this needs root."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from tests.conftest import REQUIRE_POSTGRES, connect, settings_for, start_broker


def cluster() -> list[str]:
    versions = (
        sorted(os.listdir("/etc/postgresql"), key=int) if Path("/etc/postgresql").exists() else []
    )
    if not versions or shutil.which("pg_ctlcluster") is None or os.geteuid() != 0:
        message = "stopping PostgreSQL needs pg_ctlcluster and root"
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        pytest.skip(message)
    return [versions[-1], "main"]


@pytest.fixture
def postgres_control() -> Iterator[Any]:
    """stop() / start() the test PostgreSQL; it is always running again after the test."""
    which = cluster()

    class Control:
        @staticmethod
        def stop() -> None:
            subprocess.run(["pg_ctlcluster", *which, "stop", "-m", "fast"], check=True)

        @staticmethod
        def start() -> None:
            subprocess.run(["pg_ctlcluster", *which, "start"], check=False)

    yield Control
    Control.start()


async def test_store_outage_keeps_cached_runs_and_recovers(
    postgres_url: str,
    postgres_control: Any,
    local_aws: LocalAws,
    tenant: str,
    template_url: str,
    broker_identity: Identity,
) -> None:
    settings = settings_for(postgres_url, local_aws, template_url) | {"recheck_interval": 1.0}
    async with start_broker(settings, broker_identity) as running:
        stub = running.stub
        await connect(running, local_aws, tenant)
        cached = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="cached")
        before = await stub.IssueCredentials(cached)
        stream = stub.WatchCredentials(
            pb.WatchCredentialsRequest(tenant_id=tenant, run_id="cached")
        )
        await stream.read()

        postgres_control.stop()
        again = await stub.IssueCredentials(cached, timeout=5)
        assert again.credentials.access_key_id == before.credentials.access_key_id
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await stub.GetConnection(pb.GetConnectionRequest(tenant_id=tenant), timeout=10)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 3.0, "UNAVAILABLE quickly, not at the deadline"
        with pytest.raises(grpc.aio.AioRpcError) as create:
            await stub.CreateConnection(
                pb.CreateConnectionRequest(tenant_id="newcomer"), timeout=10
            )
        assert create.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.sleep(2.5)  # re-checks fail meanwhile: they must not end the stream
        assert len(running.broker.hub) == 1

        postgres_control.start()
        for _ in range(100):
            try:
                got = await stub.GetConnection(pb.GetConnectionRequest(tenant_id=tenant), timeout=5)
                break
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.2)
        else:
            pytest.fail("the broker did not recover after PostgreSQL came back")
        assert got.connection.status == pb.CONNECTION_STATUS_ACTIVE, "nothing was lost"
        await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id="newcomer"))
        await stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(stream.read(), timeout=5)
        assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
