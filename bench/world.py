"""What every measurement stands on: the local AWS emulator (in this process), the broker's
AWS identity in it, and brokers started as real processes against it."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.procs import BIN, Process, pinned
from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc

SERVER_CORE = 1  # servers under measurement run here; load generators on core 0


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


def wait_serving(target: str, timeout: float = 60) -> None:
    """Until grpc.health.v1 at `target` answers SERVING."""
    with grpc.insecure_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=timeout
        )
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{target} is not SERVING")
