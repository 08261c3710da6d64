"""A typed async client for the broker, for the internal services (UI back end, launcher).

async with BrokerClient("broker.internal:50051", tls=ClientTls(...)) as broker:
    credentials = await broker.issue_credentials("acme", "run-42")
    async for credentials in broker.watch_credentials("acme", "run-42"):
        ...  # new credentials before each expiry, across broker restarts; ends when released

Every failure is a `BrokerClientError`, told apart by the broker's rich status (code, the
google.rpc.ErrorInfo reason where the broker gives one, else the PreconditionFailure violation
type), never by its message text. `str()` is one line, safe to show (the broker's own message,
which never holds a secret):

    BrokerClientError            the broker failed the call in a way not listed below (INTERNAL…)
    ├── Refused                  permanent: the same call fails again; do not retry
    │   ├── TenantNotActive      the tenant's connection is not ACTIVE (PENDING, SUSPENDED,
    │   │   │                    DISCONNECTED): CONNECTION_NOT_ACTIVE
    │   │   └── TenantDisconnected   a watch was ended for the tenant while it ran (disconnected,
    │   │       │                or suspended): TENANT_DISCONNECTED, or STREAM_ENDED naming it
    │   │       └── TenantSuspended  … because its role stopped passing verification:
    │   │                        CONNECTION_SUSPENDED
    │   ├── TenantNotFound       no connection for the tenant (NOT_FOUND)
    │   ├── PermissionDenied     this caller may not (PERMISSION_DENIED, UNAUTHENTICATED)
    │   ├── RoleNotAssumable     AWS refuses the customer's role (ROLE_NOT_ASSUMABLE)
    │   └── InvalidRequest       a malformed tenant or run id (INVALID_ARGUMENT)
    └── BrokerUnavailable        not reached, or UNAVAILABLE, for `connect_timeout` seconds

A release of the run (RUN_RELEASED, or from an older broker STREAM_ENDED naming the run) is no
error: the watch just ends.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.config import is_loopback, split_host_port
from broker.delivery import RunCredentials
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc

log = logging.getLogger(__name__)

# Codes after which a call is made (a stream opened) again, on this or another replica, while
# the connect budget lasts: the replica went away, was busy, or the call was cut short.
# CANCELLED is among them: this client's own cancellations never come back as a status, so
# one that does was the server's, e.g. gRPC core cancelling a call that reached a replica in
# the instant it stopped accepting (docs/reliability.md); the calls retried are idempotent.
# FAILED_PRECONDITION (run released, tenant disconnected) and the caller's own errors end it.
RECONNECT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
DEFAULT_CONNECT_TIMEOUT = 10.0
MAX_MESSAGE = 1000  # characters of the broker's message kept in an error's one line

ERROR_DOMAIN = "broker.v1"  # google.rpc.ErrorInfo.domain of the broker's reasons
# PreconditionFailure violation types the broker sends (broker/errors.py).
STREAM_ENDED = "STREAM_ENDED"
CONNECTION_NOT_ACTIVE = "CONNECTION_NOT_ACTIVE"
ROLE_NOT_ASSUMABLE = "ROLE_NOT_ASSUMABLE"

T = TypeVar("T")


class BrokerClientError(Exception):
    """A call the broker (or the way to it) failed. `str()` is one line: what kind of failure,
    then the broker's message. `code` and `status` are the gRPC code and the rich status
    (google.rpc.Status with its details), where the broker answered."""

    kind = "the broker failed the call"

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode | None = None,
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(f"{self.kind}: {_one_line(message)}")
        self.code = code
        self.status = status


class Refused(BrokerClientError):
    """Permanent: the same call will fail again until someone changes something."""

    kind = "refused"


class TenantNotActive(Refused):
    kind = "the tenant is not connected"


class TenantDisconnected(TenantNotActive):
    """The run's stream was ended for its tenant: disconnected, or suspended (the broker reports
    both alike; its message says which)."""

    kind = "the tenant's connection ended"


class TenantSuspended(TenantDisconnected):
    """The run's stream was ended because its tenant's role no longer passes verification; the
    customer must fix the role and verify it again (GetConnection says what failed)."""

    kind = "the tenant's connection was suspended"


class TenantNotFound(Refused):
    kind = "unknown tenant"


class PermissionDenied(Refused):
    kind = "permission denied"


class RoleNotAssumable(Refused):
    kind = "the customer's role cannot be assumed"


class InvalidRequest(Refused):
    kind = "invalid request"


class BrokerUnavailable(BrokerClientError):
    """Retryable later: the broker could not be reached, or answered UNAVAILABLE, for the
    whole connect budget."""

    kind = "the broker is unavailable"


REFUSAL_OF_CODE: dict[grpc.StatusCode, type[Refused]] = {
    grpc.StatusCode.NOT_FOUND: TenantNotFound,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
}
REFUSAL_OF_REASON: dict[str, type[Refused]] = {
    "TENANT_DISCONNECTED": TenantDisconnected,
    "CONNECTION_SUSPENDED": TenantSuspended,
    "CONNECTION_NOT_ACTIVE": TenantNotActive,
    "ROLE_NOT_ASSUMABLE": RoleNotAssumable,
}
REFUSAL_OF_VIOLATION: dict[str, type[Refused]] = {
    STREAM_ENDED: TenantDisconnected,
    CONNECTION_NOT_ACTIVE: TenantNotActive,
    ROLE_NOT_ASSUMABLE: RoleNotAssumable,
}


def _one_line(text: str) -> str:
    """`text` with every run of whitespace or control characters made one space, bounded."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= MAX_MESSAGE else flat[: MAX_MESSAGE - 1] + "…"


def _violations(status: status_pb2.Status | None) -> list[tuple[str, str]]:
    """(type, subject) of each PreconditionFailure violation in the rich status."""
    found = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            found += [(v.type, v.subject) for v in failure.violations]
    return found


def _rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
    except ValueError:  # details that do not match the code: read as if there were none
        return None
    return status


def retry_after(error: grpc.aio.AioRpcError) -> float:
    """The seconds the broker's google.rpc.RetryInfo asks a caller to wait (a fair-share
    limit: docs/deploy.md), else 0."""
    status = _rich_status(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return max(float(info.retry_delay.ToNanoseconds()) / 1e9, 0.0)
    return 0.0


def _reason(status: status_pb2.Status | None) -> tuple[str, dict[str, str]] | None:
    """The broker's google.rpc.ErrorInfo (reason, metadata) in the rich status, if any."""
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                return info.reason, dict(info.metadata)
    return None


def is_release(error: grpc.aio.AioRpcError, tenant_id: str, run_id: str) -> bool:
    """Whether `error` ends a watch because the run was released: RUN_RELEASED for this run.
    From a broker that gives no reason, STREAM_ENDED naming the run; there a run id equal to
    its tenant id cannot be told from a disconnect, so it is not taken for a release."""
    if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return False
    status = _rich_status(error)
    reason = _reason(status)
    if reason is not None:
        return reason[0] == "RUN_RELEASED" and reason[1].get("run_id") == run_id
    return run_id != tenant_id and (STREAM_ENDED, run_id) in _violations(status)


def translate(error: grpc.aio.AioRpcError) -> BrokerClientError:
    """The typed error for a call the broker failed (the one place gRPC errors are mapped)."""
    code = error.code()
    status = _rich_status(error)
    message = error.details() or code.name
    kind: type[BrokerClientError] = BrokerClientError
    if code in RECONNECT_CODES:
        kind = BrokerUnavailable
    elif code in REFUSAL_OF_CODE:
        kind = REFUSAL_OF_CODE[code]
    elif code == grpc.StatusCode.FAILED_PRECONDITION:
        reason = _reason(status)
        types = [t for t, _ in _violations(status)]
        if reason is not None and reason[0] in REFUSAL_OF_REASON:
            kind = REFUSAL_OF_REASON[reason[0]]
        else:
            kind = next(
                (REFUSAL_OF_VIOLATION[t] for t in types if t in REFUSAL_OF_VIOLATION), Refused
            )
    return kind(message, code, status)


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
    Calls raise `BrokerClientError`s (module docstring). `issue_credentials` and
    `watch_credentials` try again, with jittered backoff, for `connect_timeout` seconds (None:
    for ever) before raising BrokerUnavailable; the other calls raise it at the first failure.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: ClientTls | None = None,
        token: str | None = None,
        reconnect_backoff: tuple[float, float] = (0.2, 10.0),
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        check_transport(target, tls)
        options = [("grpc.keepalive_time_ms", 30_000), ("grpc.enable_retries", 1)]
        if tls is None:
            # Plaintext is allowed to loopback only: never through an HTTP proxy that
            # http(s)_proxy / grpc_proxy would otherwise send the token and credentials to.
            options.append(("grpc.enable_http_proxy", 0))
        self._channel = (
            grpc.aio.secure_channel(target, tls.credentials(), options=options)
            if tls
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._target = target
        self._stub = broker_pb2_grpc.CredentialBrokerStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._backoff = reconnect_backoff
        self._connect_timeout = connect_timeout

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

    def _unavailable(self, waited: float, cause: str) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"no answer from {self._target} within {waited:.1f} s"
            + (f" (last error: {cause})" if cause else "")
        )

    async def _once(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise translate(error) from None

    async def _retrying(self, call: Callable[[float], Awaitable[T]], deadline: float) -> T:
        """`call(timeout)` again after a retryable failure until one answers or the connect
        budget is spent (BrokerUnavailable); each attempt waits at most `deadline`."""
        low, high = self._backoff
        delay, cause, started = low, "", time.monotonic()
        budget = self._connect_timeout
        while True:
            left = deadline if budget is None else started + budget - time.monotonic()
            if left <= 0:
                raise self._unavailable(time.monotonic() - started, cause)
            try:
                return await call(min(deadline, left))
            except grpc.aio.AioRpcError as error:
                if error.code() not in RECONNECT_CODES:
                    raise translate(error) from None
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # ours: says nothing new
                    cause = _one_line(error.details() or error.code().name)
                # The broker's RetryInfo (a limit reached) is a floor: sooner is refused again.
                pause = max(random.uniform(0, delay), retry_after(error))  # noqa: S311 - jitter
            if budget is not None:
                pause = min(pause, max(started + budget - time.monotonic(), 0))
            log.info("broker call failed; retrying", extra={"retry_in": round(pause, 2)})
            await asyncio.sleep(pause)
            delay = min(delay * 2, high)

    async def create_connection(self, tenant_id: str, region: str = "") -> pb.Connection:
        request = pb.CreateConnectionRequest(tenant_id=tenant_id, region=region)
        return (await self._once(self._stub.CreateConnection(request, **self._call()))).connection

    async def verify_role(
        self, tenant_id: str, role_arn: str, deadline: float = 60
    ) -> pb.Connection:
        request = pb.VerifyRoleRequest(tenant_id=tenant_id, role_arn=role_arn)
        answer = await self._once(self._stub.VerifyRole(request, **self._call(timeout=deadline)))
        return answer.connection

    async def get_connection(self, tenant_id: str) -> pb.Connection:
        request = pb.GetConnectionRequest(tenant_id=tenant_id)
        return (await self._once(self._stub.GetConnection(request, **self._call()))).connection

    async def disconnect(self, tenant_id: str) -> pb.Connection:
        request = pb.DisconnectRequest(tenant_id=tenant_id)
        return (await self._once(self._stub.Disconnect(request, **self._call()))).connection

    async def issue_credentials(
        self, tenant_id: str, run_id: str, deadline: float = 10
    ) -> RunCredentials:
        """The run's credentials now (the broker's cached ones while they are fresh)."""
        request = pb.IssueCredentialsRequest(tenant_id=tenant_id, run_id=run_id)
        answer = await self._retrying(
            lambda timeout: self._stub.IssueCredentials(request, **self._call(timeout=timeout)),
            deadline,
        )
        return RunCredentials.from_pb(answer.credentials)

    async def release_credentials(self, tenant_id: str, run_id: str) -> None:
        request = pb.ReleaseCredentialsRequest(tenant_id=tenant_id, run_id=run_id)
        await self._once(self._stub.ReleaseCredentials(request, **self._call()))

    async def watch_credentials(self, tenant_id: str, run_id: str) -> AsyncIterator[RunCredentials]:
        """The run's credentials now and before each expiry. When a replica goes away the
        stream is opened again with jittered backoff (the broker serves the same credentials
        from its cache, or new ones). It ends when the run is released; it raises Refused
        (TenantNotActive, TenantDisconnected, TenantNotFound, PermissionDenied, …) when the
        broker will not serve the run, and BrokerUnavailable once no stream has answered for
        `connect_timeout` seconds and the last credentials yielded (if any) have expired: while
        they are valid, a sandbox using them loses nothing by the wait."""
        request = pb.WatchCredentialsRequest(tenant_id=tenant_id, run_id=run_id)
        low, high = self._backoff
        delay, cause = low, ""
        last_key = None
        failing_since: float | None = time.monotonic()  # None while a stream answers
        valid_until = 0.0  # monotonic time the last credentials yielded expire

        def left() -> float:
            """Seconds until the watch gives up, while no stream answers."""
            if self._connect_timeout is None or failing_since is None:
                return float("inf")
            give_up = max(failing_since + self._connect_timeout, valid_until)
            return give_up - time.monotonic()

        while True:
            if left() <= 0:
                raise self._unavailable(time.monotonic() - (failing_since or 0), cause)
            stream = self._stub.WatchCredentials(request, **self._call())
            try:
                while True:
                    waiting = left()
                    try:
                        if waiting == float("inf"):
                            message = await stream.read()
                        else:
                            message = await asyncio.wait_for(stream.read(), waiting)
                    except TimeoutError:
                        break
                    if not isinstance(message, pb.WatchCredentialsResponse):
                        return  # EOF: the server ended the stream cleanly
                    failing_since, delay = None, low
                    if message.credentials.access_key_id != last_key:
                        last_key = message.credentials.access_key_id
                        credentials = RunCredentials.from_pb(message.credentials)
                        remaining = (credentials.expiration - datetime.now(UTC)).total_seconds()
                        valid_until = time.monotonic() + remaining
                        yield credentials
            except grpc.aio.AioRpcError as error:
                if is_release(error, tenant_id, run_id):
                    log.info("run released", extra={"tenant": tenant_id, "run": run_id})
                    return
                if error.code() not in RECONNECT_CODES:
                    raise translate(error) from None
                cause = _one_line(error.details() or error.code().name)
                if failing_since is None:
                    failing_since = time.monotonic()
                pause = max(random.uniform(0, delay), retry_after(error))  # noqa: S311 - jitter
                pause = min(pause, max(left(), 0))
                log.info("broker went away; reconnecting", extra={"retry_in": round(pause, 2)})
                await asyncio.sleep(pause)
                delay = min(delay * 2, high)
            finally:
                stream.cancel()
