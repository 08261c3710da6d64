"""A typed async client for the broker, for the internal services (UI back end, launcher).

async with BrokerClient("broker.internal:50051", tls=ClientTls(...)) as broker:
    credentials = await broker.issue_credentials("acme", "run-42")
    async for credentials in broker.watch_credentials("acme", "run-42"):
        ...  # new credentials before each expiry, across broker restarts
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from broker.config import is_loopback, split_host_port
from broker.delivery import RunCredentials
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc

log = logging.getLogger(__name__)

# Codes after which a stream is opened again (on this or another replica): the replica went
# away, or the call was cut short. FAILED_PRECONDITION (run released, tenant disconnected)
# and the caller's own errors end the watch.
RECONNECT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


# gRPC target schemes whose addresses are sockets on this machine.
LOCAL_SOCKET_SCHEMES = ("unix:", "unix-abstract:")


class PlaintextRefused(ValueError):
    """A broker off this machine was given without TLS: the bearer token and the credentials
    in the answers would cross the network in plaintext."""


def target_hosts(target: str) -> list[str] | None:
    """The hosts a gRPC target reaches, or None for a local socket (unix:, unix-abstract:).
    Forms: host:port, [v6]:port, dns:[//authority/]host:port, ipv4:a:p[,…], ipv6:[a]:p[,…].
    A target whose host cannot be made out is returned whole, so it counts as not loopback."""
    if target.startswith(LOCAL_SOCKET_SCHEMES):
        return None
    if target.startswith(("ipv4:", "ipv6:")):
        addresses = target.partition(":")[2].split(",")
    elif target.startswith("dns:"):
        name = target.removeprefix("dns:")
        if name.startswith("//"):
            name = name[2:].partition("/")[2]  # past the DNS server's authority, if any
        addresses = [name]
    else:
        addresses = [target]
    hosts = []
    for address in addresses:
        try:
            hosts.append(split_host_port(address)[0])
        except ValueError:
            hosts.append(address)
    return hosts


def check_transport(target: str, tls: ClientTls | None) -> None:
    """Raise PlaintextRefused unless `target` is reached over TLS or stays on this machine
    (loopback: 127.0.0.0/8, ::1, "localhost"; or a unix socket)."""
    if tls is not None:
        return
    hosts = target_hosts(target)
    if hosts is not None and not all(is_loopback(host) for host in hosts):
        raise PlaintextRefused(
            f"refusing to reach the broker at {target} without TLS: the bearer token and the "
            "AWS credentials would cross the network in plaintext. Give the broker's CA "
            "(ClientTls, or --ca-file), or use a loopback address"
        )


@dataclass(frozen=True)
class ClientTls:
    """TLS to the broker: its CA, and for mTLS this service's certificate and key (PEM files)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = field(default=None, repr=False)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.ca_file.read_bytes(),
            self.key_file.read_bytes() if self.key_file else None,
            self.cert_file.read_bytes() if self.cert_file else None,
        )


class BrokerClient:
    """One channel to the broker. Close it (or use `async with`).

    Without `tls`, `target` must be loopback or a unix socket: PlaintextRefused is raised
    before any channel is made (a token or credentials never cross the network in the clear).
    """

    def __init__(
        self,
        target: str,
        *,
        tls: ClientTls | None = None,
        token: str | None = None,
        reconnect_backoff: tuple[float, float] = (0.2, 10.0),
    ) -> None:
        check_transport(target, tls)
        options = [("grpc.keepalive_time_ms", 30_000), ("grpc.enable_retries", 1)]
        self._channel = (
            grpc.aio.secure_channel(target, tls.credentials(), options=options)
            if tls
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._stub = broker_pb2_grpc.CredentialBrokerStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._backoff = reconnect_backoff

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _call(self, **extra: Any) -> dict[str, Any]:
        return {"metadata": self._metadata, **extra}

    async def create_connection(self, tenant_id: str, region: str = "") -> pb.Connection:
        request = pb.CreateConnectionRequest(tenant_id=tenant_id, region=region)
        return (await self._stub.CreateConnection(request, **self._call())).connection

    async def verify_role(
        self, tenant_id: str, role_arn: str, deadline: float = 60
    ) -> pb.Connection:
        request = pb.VerifyRoleRequest(tenant_id=tenant_id, role_arn=role_arn)
        return (await self._stub.VerifyRole(request, **self._call(timeout=deadline))).connection

    async def get_connection(self, tenant_id: str) -> pb.Connection:
        request = pb.GetConnectionRequest(tenant_id=tenant_id)
        return (await self._stub.GetConnection(request, **self._call())).connection

    async def disconnect(self, tenant_id: str) -> pb.Connection:
        request = pb.DisconnectRequest(tenant_id=tenant_id)
        return (await self._stub.Disconnect(request, **self._call())).connection

    async def issue_credentials(
        self, tenant_id: str, run_id: str, deadline: float = 10
    ) -> RunCredentials:
        request = pb.IssueCredentialsRequest(tenant_id=tenant_id, run_id=run_id)
        answer = await self._stub.IssueCredentials(request, **self._call(timeout=deadline))
        return RunCredentials.from_pb(answer.credentials)

    async def release_credentials(self, tenant_id: str, run_id: str) -> None:
        request = pb.ReleaseCredentialsRequest(tenant_id=tenant_id, run_id=run_id)
        await self._stub.ReleaseCredentials(request, **self._call())

    async def watch_credentials(self, tenant_id: str, run_id: str) -> AsyncIterator[RunCredentials]:
        """The run's credentials now and before each expiry. When a replica goes away the
        stream is opened again with jittered backoff (the broker serves the same credentials
        from its cache, or new ones); it ends when the run is released or the tenant
        disconnected (FAILED_PRECONDITION), and raises on any other error."""
        request = pb.WatchCredentialsRequest(tenant_id=tenant_id, run_id=run_id)
        low, high = self._backoff
        delay = low
        last_key = None
        while True:
            stream = self._stub.WatchCredentials(request, **self._call())
            try:
                async for message in stream:
                    delay = low
                    if message.credentials.access_key_id != last_key:
                        last_key = message.credentials.access_key_id
                        yield RunCredentials.from_pb(message.credentials)
                return  # the server ended the stream cleanly
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    log.info("watch ended", extra={"tenant": tenant_id, "run": run_id})
                    return
                if error.code() not in RECONNECT_CODES:
                    raise
                pause = random.uniform(0, delay)  # noqa: S311 - jitter, not security
                log.info("broker went away; reconnecting", extra={"retry_in": round(pause, 2)})
                await asyncio.sleep(pause)
                delay = min(delay * 2, high)
            finally:
                stream.cancel()
