"""What every measurement stands on: the local AWS emulator (in this process), the broker's
AWS identity in it, brokers started as real processes against it, and the STS stand-in
(bench/fakests.py) that the capacity sections' brokers send AssumeRole to instead."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import fakests
from bench.procs import BIN, Process, pinned
from broker.config import DEFAULT_REGION
from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc

SERVER_CORE = 1  # servers under measurement run here; load generators on core 0
STS_CORE = 0  # the STS stand-in: beside the load generators, off the broker's core
# A broker answered by the stand-in never re-verifies a role while it is measured: the stand-in
# checks no trust policy, so VerifyRole's probe without the external ID would pass and the
# broker would rightly suspend the tenant. Roles are verified against the emulator beforehand.
NO_REVERIFY = 86400


def capacity(sts_max_concurrency: int) -> dict[str, Any]:
    """Settings for a row that measures what one broker can do, not what one tenant or caller
    may: BROKER_STS_MAX_CONCURRENCY as given, and the fair-share limits (BROKER_TENANT_*,
    BROKER_CALLER_*: new sessions per second, a tenant's share of the STS slots, open streams)
    raised out of the way, so one tenant may use the whole broker."""
    return {
        "sts_max_concurrency": sts_max_concurrency,
        "tenant_sts_concurrency": sts_max_concurrency,
        "tenant_sts_rate": 1_000_000,
        "tenant_sts_burst": 1_000_000,
        "tenant_max_streams": 1_000_000,
        "caller_max_streams": 1_000_000,
    }


@dataclass
class RunningBroker:
    process: Process
    port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return str(answer.read().decode())

    def counter(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include `labels`."""
        total = 0.0
        for line in self.scrape().splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in sample for k, v in labels.items()):
                total += float(value)
        return total


@dataclass
class World:
    aws: LocalAws
    identity: Identity
    template_url: str
    folder: Path
    _started: int = field(default=0)

    def broker_env(self, **settings: object) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "AWS_"))}
        self._started += 1
        env |= {
            "BROKER_LISTEN": "127.0.0.1:0",
            "BROKER_DATABASE_URL": f"sqlite:///{self.folder}/broker-{self._started}.db",
            "BROKER_AWS_ENDPOINT_URL": self.aws.endpoint_url,
            "BROKER_TEMPLATE_URL": self.template_url,
            "BROKER_TRUSTED_PRINCIPAL_ARN": self.identity.arn,
            "BROKER_METRICS_LISTEN": "127.0.0.1:0",
            "BROKER_LOG_FORMAT": "json",
            "BROKER_VERIFY_WAIT": "1",
            "BROKER_DRAIN_SECONDS": "0",
            "AWS_ACCESS_KEY_ID": self.identity.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.identity.secret_access_key,
        }
        env |= {f"BROKER_{k.upper()}": str(v) for k, v in settings.items()}
        return env

    @contextlib.contextmanager
    def broker(
        self,
        name: str,
        core: int | None = SERVER_CORE,
        src: Path | None = None,
        **settings: object,
    ) -> Iterator[RunningBroker]:
        """`broker serve` with `settings`; with `src`, the broker package found there (another
        revision's) instead of this checkout's, on this checkout's dependencies."""
        port, metrics_port = free_port(), free_port()
        env = self.broker_env(
            listen=f"127.0.0.1:{port}", metrics_listen=f"127.0.0.1:{metrics_port}", **settings
        )
        command = [str(BIN / "broker"), "serve"]
        if src is not None:
            env["PYTHONPATH"] = str(src)
            command = [sys.executable, "-m", "broker", "serve"]
        process = Process(pinned(command, core), self.folder / f"{name}.log", env=env)
        try:
            # Health, not the log: a broker may be measured with its INFO lines off.
            wait_serving(f"127.0.0.1:{port}")
            yield RunningBroker(process, port, metrics_port)
        finally:
            process.stop()

    @contextlib.contextmanager
    def fake_sts(
        self, name: str, latency: float = fakests.DEFAULT_LATENCY, lifetime: float | None = None
    ) -> Iterator[fakests.FakeSts]:
        """The STS stand-in in its own process, answering after `latency` seconds with
        credentials that live `lifetime` seconds (None: as long as asked)."""
        with fakests.running(self.folder / f"{name}.log", STS_CORE, latency, lifetime) as sts:
            yield sts

    async def verified_store(self, name: str, tenants: Sequence[str]) -> str:
        """The database URL of a new store in which `tenants` are ACTIVE: each connected and
        verified through a broker on the emulator, whose STS enforces trust policies (the
        stand-in's does not)."""
        url = f"sqlite:///{self.folder}/{name}.db"
        with self.broker(f"{name}-verify", database_url=url) as broker:
            async with stub_for(broker.target) as stubs:
                for tenant in tenants:
                    await connect(self, stubs[0], tenant)
        return url

    @contextlib.contextmanager
    def broker_on(
        self,
        sts: fakests.FakeSts | Mapping[str, fakests.FakeSts],
        name: str,
        store: str,
        **settings: Any,
    ) -> Iterator[RunningBroker]:
        """`broker serve` on `store` (from `verified_store`) with its AssumeRole going to the
        stand-in `sts`, or to {region: stand-in} in order of preference (BROKER_STS_REGIONS,
        BROKER_STS_ENDPOINT_URLS); IAM stays on the emulator. It does not re-verify roles
        (NO_REVERIFY)."""
        regions = sts if isinstance(sts, Mapping) else {DEFAULT_REGION: sts}
        with self.broker(
            name,
            database_url=store,
            sts_regions=",".join(regions),
            sts_endpoint_urls=",".join(f"{r}={s.url}" for r, s in regions.items()),
            reverify_interval=NO_REVERIFY,
            **settings,
        ) as broker:
            yield broker


def free_port() -> int:
    """A loopback port nothing listens on (for a server told its port in advance)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as folder:
        aws = LocalAws().start()
        try:
            identity = aws.create_user("credential-broker")
            yield World(aws, identity, aws.publish_template(identity.arn), Path(folder))
        finally:
            aws.stop()


@contextlib.asynccontextmanager
async def stub_for(target: str, channels: int = 1) -> AsyncIterator[list[Any]]:
    """Stubs on `channels` separate connections (one connection caps concurrent streams)."""
    opened = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]
    try:
        # Typed Any: the generated stubs are typed for the sync API.
        yield [broker_pb2_grpc.CredentialBrokerStub(c) for c in opened]
    finally:
        for channel in opened:
            await channel.close()


async def connect(world: World, stub: Any, tenant: str) -> None:
    """CreateConnection → the customer's stack in the emulator → VerifyRole: ACTIVE."""
    created = await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    role_arn = world.aws.create_customer_stack(created.connection.quick_create_url)
    verified = await stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))
    if verified.connection.status != pb.CONNECTION_STATUS_ACTIVE:
        raise RuntimeError(f"tenant {tenant} did not become ACTIVE")


async def warm_up(stub: Any, sts: fakests.FakeSts, tenant: str) -> None:
    """One IssueCredentials, which must have reached the stand-in (a broker that ignored
    BROKER_STS_ENDPOINT_URLS would measure the emulator again); then the stand-in's counts
    start from 0."""
    sts.reset()
    await stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="warm-up"))
    if sts.stats()["AssumeRole"] != 1:
        raise RuntimeError(
            "the broker's AssumeRole did not reach the STS stand-in: does it read "
            "BROKER_STS_ENDPOINT_URLS?"
        )
    sts.reset()


def wait_serving(target: str, timeout: float = 60) -> None:
    """Until grpc.health.v1 at `target` answers SERVING."""
    with grpc.insecure_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=timeout
        )
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{target} is not SERVING")
