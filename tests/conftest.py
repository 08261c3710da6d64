"""Shared fixtures: a local AWS emulator (moto + enforced trust policies) on 127.0.0.1, and a real
broker (grpc.aio server on 127.0.0.1:<free port>) in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import os
import re
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from broker import server
from broker.auth import hash_token, new_token
from broker.config import load_settings
from broker.emulator import AssumeRoleCall, Identity, LocalAws, RegionalEndpoint
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc

_tenants = itertools.count(1)


@pytest.fixture(scope="session")
def local_aws() -> Iterator[LocalAws]:
    aws = LocalAws().start()
    yield aws
    aws.stop()


@pytest.fixture(scope="session")
def broker_identity(local_aws: LocalAws) -> Identity:
    return local_aws.create_user("credential-broker")


@pytest.fixture(scope="session")
def template_url(local_aws: LocalAws, broker_identity: Identity) -> str:
    """The customer template, published as an operator does: made for the broker's principal."""
    return local_aws.publish_template(broker_identity.arn)


@pytest.fixture(autouse=True)
def _reset_emulator(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests may shorten credential lifetimes or delay role propagation; undo it after each."""
    yield
    if "local_aws" in request.fixturenames:
        aws: LocalAws = request.getfixturevalue("local_aws")
        aws.sts.session_lifetime = None
        aws.sts.propagation_delay = 0.0
        aws.sts.latency = 0.0


class StsLog:
    """The AssumeRole calls the emulator answered (or refused) since the test began."""

    def __init__(self, aws: LocalAws) -> None:
        self._aws = aws
        self._start = len(aws.sts.calls)

    def now(self) -> list[AssumeRoleCall]:
        return self._aws.sts.calls[self._start :]


@pytest.fixture
def sts_log(local_aws: LocalAws) -> StsLog:
    return StsLog(local_aws)


@pytest.fixture
def tenant() -> str:
    return f"tenant-{next(_tenants)}"


POSTGRES_URL = os.environ.get(
    "BROKER_TEST_POSTGRES_URL", "postgresql://broker_test:broker_test@127.0.0.1:5432/postgres"
)
# In CI a skipped PostgreSQL test is a failure: the suite must have run on both stores.
REQUIRE_POSTGRES = os.environ.get("BROKER_TEST_REQUIRE_POSTGRES") == "1"
POSTGRES_STATE: dict[str, str] = {}


async def _postgres_reachable() -> str | None:
    """None when the test PostgreSQL answers, else why not."""
    if "problem" not in POSTGRES_STATE:
        try:
            connection = await asyncpg.connect(POSTGRES_URL, timeout=3)
            await connection.close()
            POSTGRES_STATE["problem"] = ""
        except Exception as exc:
            POSTGRES_STATE["problem"] = f"{type(exc).__name__}: {exc}"
    return POSTGRES_STATE["problem"] or None


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Each test that stores connections runs on SQLite and on PostgreSQL (a fresh database)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.db'}"
        return
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database, for tests that need PostgreSQL itself (replicas)."""
    async with fresh_postgres_database() as url:
        yield url


@contextlib.asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """A new, empty database on the test PostgreSQL, dropped after; a skip (a failure in CI)
    when there is no PostgreSQL."""
    problem = await _postgres_reachable()
    if problem:
        message = f"PostgreSQL not reachable at {redact_url(POSTGRES_URL)} ({problem})"
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        POSTGRES_STATE["skipped"] = message
        pytest.skip(message + "; run scripts/postgres-for-tests.sh to test it")
    name = f"broker_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        admin = await asyncpg.connect(POSTGRES_URL)  # anew: a test may have restarted the server
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def redact_url(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


async def stored_bytes(database_url: str) -> bytes:
    """Everything the store holds, as bytes to search: the SQLite files, or every PostgreSQL row."""
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    connection = await asyncpg.connect(database_url)
    try:
        tables = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
        rows = []
        for table in tables:
            rows += await connection.fetch(f'SELECT * FROM "{table["tablename"]}"')
    finally:
        await connection.close()
    return repr([tuple(r) for r in rows]).encode()


async def metrics_text(running: Running) -> str:
    """GET /metrics as Prometheus would, from another thread (the broker's loop keeps running)."""
    url = f"http://127.0.0.1:{running.broker.metrics_port}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return str(answer.read().decode())

    return await asyncio.to_thread(get)


@contextlib.contextmanager
def captured_logs(formatter: logging.Formatter, level: int) -> Iterator[io.StringIO]:
    """Everything every logger writes at `level` and above, formatted by `formatter`."""
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield sink
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


FIRST, SECOND = "us-east-1", "us-west-2"  # the STS regions of the failover tests


@pytest.fixture
def regions(local_aws: LocalAws) -> Iterator[tuple[RegionalEndpoint, RegionalEndpoint]]:
    """The two regions' endpoints, up; back up after the test whatever it did to them."""
    first, second = local_aws.serve_region(FIRST), local_aws.serve_region(SECOND)
    yield first, second
    first.up()
    second.up()


@dataclass
class Running:
    broker: server.Broker
    stub: broker_pb2_grpc.CredentialBrokerStub
    channel: grpc.aio.Channel
    database_url: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.broker.port}"


@pytest.fixture
def broker_settings(local_aws: LocalAws, template_url: str, database_url: str) -> dict[str, Any]:
    """Overrides for the broker under test (on each store in turn)."""
    return settings_for(database_url, local_aws, template_url)


def settings_for(database_url: str, local_aws: LocalAws, template_url: str) -> dict[str, Any]:
    """Overrides for a broker on `database_url` against the local emulator."""
    return {
        "listen": "127.0.0.1:0",
        "database_url": database_url,
        "aws_endpoint_url": local_aws.endpoint_url,
        "template_url": template_url,
        "verify_wait": 1.0,
        "shutdown_grace": 1.0,
        "metrics_listen": "127.0.0.1:0",
    }


@contextlib.asynccontextmanager
async def start_broker(overrides: dict[str, Any], identity: Identity) -> AsyncIterator[Running]:
    """A broker with `overrides` on top of the environment, and a channel to it."""
    settings = load_settings(**overrides)
    broker = await server.start(
        settings, static_credentials=(identity.access_key_id, identity.secret_access_key)
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}")
    try:
        yield Running(
            broker,
            broker_pb2_grpc.CredentialBrokerStub(channel),
            channel,
            settings.database_url,
        )
    finally:
        await channel.close()
        await broker.stop(grace=0.5)


@pytest.fixture
async def running(
    broker_settings: dict[str, Any], broker_identity: Identity
) -> AsyncIterator[Running]:
    async with start_broker(broker_settings, broker_identity) as started:
        yield started


@pytest.fixture
async def guarded(
    local_aws: LocalAws, template_url: str, broker_identity: Identity, tmp_path: Path
) -> AsyncIterator[tuple[Running, str]]:
    """A broker on loopback that wants a bearer token (`ops`, allowed every RPC), and the token."""
    token = new_token()
    settings = settings_for(f"sqlite:///{tmp_path / 'broker.db'}", local_aws, template_url) | {
        "token_hashes": f"ops={hash_token(token)}",
        "policy": "token:ops=all",
    }
    async with start_broker(settings, broker_identity) as running:
        yield running, token


async def connect(running: Running, local_aws: LocalAws, tenant_id: str) -> pb.Connection:
    """Create → the customer's stack from the real template and the link → verify: ACTIVE."""
    created = await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant_id))
    role_arn = local_aws.create_customer_stack(created.connection.quick_create_url)
    verified = await running.stub.VerifyRole(
        pb.VerifyRoleRequest(tenant_id=tenant_id, role_arn=role_arn)
    )
    assert verified.connection.status == pb.CONNECTION_STATUS_ACTIVE
    return verified.connection


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say whether the PostgreSQL half ran, and how many hostile inputs the run sent."""
    from tests import reliability, test_hostile_input

    if "skipped" in POSTGRES_STATE:
        terminalreporter.write_line(
            f"PostgreSQL tests SKIPPED: {POSTGRES_STATE['skipped']}", yellow=True, bold=True
        )
    elif POSTGRES_STATE.get("problem") == "":
        terminalreporter.write_line(f"PostgreSQL tests ran against {redact_url(POSTGRES_URL)}")
    if test_hostile_input.TRIED:
        terminalreporter.write_line(test_hostile_input.report())
    if reliability.ROWS:
        terminalreporter.write_line("reliability report:")
        terminalreporter.write_line(reliability.table())
        reliability.write_if_asked()
