"""RPC handlers: validate → domain call → response. Domain errors become gRPC status here, in
one table (`STATUS_OF`); an unexpected exception is INTERNAL with a generic message and one
`log.exception`, never its own text."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker import logs, validation
from broker.auth import ANYONE_ON_LOOPBACK, CALLER, Guard
from broker.cache import CredentialCache
from broker.connections import Connections, guidance
from broker.errors import (
    Aborted,
    AlreadyExists,
    BrokerError,
    DeadlineExceeded,
    FailedPrecondition,
    GrantChanged,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StreamEnded,
    Unauthenticated,
    Unavailable,
)
from broker.metrics import Metrics
from broker.models import Check, Connection, Credentials, Grant, Status
from broker.quotas import Limits
from broker.streams import StreamHub, watch
from broker.template import stack_name
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc
from broker.wire import METADATA, Malformed

log = logging.getLogger(__name__)

# The one mapping from domain errors to status codes (DESIGN.md, "Status codes"). First match wins.
STATUS_OF: tuple[tuple[type[BrokerError], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Aborted, grpc.StatusCode.ABORTED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)

MAX_EVENTS = 100
ERROR_DOMAIN = "broker.v1"  # google.rpc.ErrorInfo.domain of every reason the broker gives
STALE_GRANT_RETRIES = 3

STATUS_PB = {
    Status.PENDING: pb.CONNECTION_STATUS_PENDING,
    Status.ACTIVE: pb.CONNECTION_STATUS_ACTIVE,
    Status.DISCONNECTED: pb.CONNECTION_STATUS_DISCONNECTED,
    Status.SUSPENDED: pb.CONNECTION_STATUS_SUSPENDED,
}

Handler = TypeVar("Handler", bound=Callable[..., Any])


def status_for(error: BrokerError) -> grpc.Status:
    """The rich status (google.rpc.Status with details) that reports `error`."""
    code = next(code for kind, code in STATUS_OF if isinstance(error, kind))
    details = []
    if isinstance(error, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.description
        )
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    elif isinstance(error, FailedPrecondition):
        failure = error_details_pb2.PreconditionFailure()
        for v in error.violations:
            failure.violations.add(type=v.type, subject=v.subject, description=v.description)
        details.append(failure)
        if error.reason:
            details.append(
                error_details_pb2.ErrorInfo(
                    reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
                )
            )
    elif isinstance(error, ResourceExhausted):
        quota = error_details_pb2.QuotaFailure()
        quota.violations.add(subject=error.subject, description=f"{error.limit}: {error}")
        details.append(quota)
        details.append(
            error_details_pb2.ErrorInfo(
                reason=error.reason, domain=ERROR_DOMAIN, metadata={"limit": error.limit}
            )
        )
        if error.retry_after is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(int(error.retry_after * 1e9))
            details.append(retry)
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=str(error), details=packed)
    )
    return status


async def _report(context: grpc.aio.ServicerContext[Any, Any], method: str, exc: Exception) -> None:
    if isinstance(exc, BrokerError):
        await context.abort_with_status(status_for(exc))
    reference = uuid.uuid4().hex[:12]
    log.exception("unexpected error", extra={"method": method, "error_ref": reference})
    await context.abort_with_status(
        rpc_status.to_status(
            status_pb2.Status(
                code=code_pb2.INTERNAL, message=f"internal error (reference {reference})"
            )
        )
    )


class _Call:
    """Around every call: the caller is authenticated and authorised (`admit`); errors become
    status (`fail`, the one place that does); metrics and one log line with the caller and the
    request's ids only (`finish`). Requests hold no secret; the responses of IssueCredentials
    and WatchCredentials do, so no message is ever logged whole. What the caller sent is logged
    as it is only in its validated form, else bounded and escaped (`logs.untrusted`): whatever
    a caller sends, with a token or without, its line stays under 1 KiB. Plain methods, not a
    context manager: this runs on every call (docs/benchmarks.md).

    The line of a call whose fields are all plain (`_PLAIN`: text a JSON string holds as it
    is) is the access record (logs.AccessLog), made without a LogRecord; any other goes
    through `logging` (an error's, a hostile caller's, a stream's)."""

    __slots__ = ("code", "context", "fields", "method", "plain", "request", "started")

    def __init__(
        self, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        self.method, self.request, self.context = method, request, context
        self.started, self.code = time.perf_counter(), "OK"
        self.fields: dict[str, object] = {}
        self.plain = False  # `fields` is request_id and caller, both plain

    def admit(self, guard: Guard) -> None:
        context, fields = self.context, self.fields
        metadata: Any = METADATA.get()  # as the handler lookup got it
        if metadata is None:  # a method registered apart, or a handler called directly
            metadata = context.invocation_metadata()
        else:  # read once: tasks the call starts inherit its context, but not its token
            METADATA.set(None)
        for key, value in metadata or ():
            if key == "x-request-id":
                _request_id(value, fields)
                break
        else:
            fields["request_id"] = f"{_ID_PREFIX}-{next(_ids):x}"
        # Open (no authentication configured): everyone is ANYONE_ON_LOOPBACK, allowed all.
        caller = ANYONE_ON_LOOPBACK if guard.open else guard.caller(context, metadata)
        CALLER.set(caller)
        # A token's name is configured; a certificate's is only signed by our CA, which did not
        # bound its length (a SPIFFE ID may have 2,048 characters).
        identity = caller.identity
        if _plain(identity):
            fields["caller"] = identity
            self.plain = len(fields) == 2  # and the request id was not rejected
        elif caller.method != "mtls" or _IDENTITY(identity):
            fields["caller"] = identity
        else:
            logs.untrusted(fields, "caller", identity)
        request = self.request
        if isinstance(request, Malformed):
            raise InvalidArgument("request", f"is not a valid {request.type_name} message")
        if not guard.open:
            guard.check(caller, self.method, request.tenant_id)

    async def fail(self, exc: Exception) -> None:
        self.code = _code_name(exc)
        await _report(self.context, self.method, exc)

    def finish(self, metrics: Metrics, log_ok: bool) -> None:
        """Count the call; log it, unless it ended OK and `log_ok` is off (BROKER_RPC_LOG)."""
        elapsed = time.perf_counter() - self.started
        code = self.code
        metrics.rpc_done(self.method, code, elapsed)
        if not log_ok and code == "OK":
            return
        request = self.request
        tenant = getattr(request, "tenant_id", "")
        run = getattr(request, "run_id", "")
        tenant_plain = not tenant or _TENANT_ID(tenant) is not None
        run_plain = not run or _RUN_ID(run) is not None
        known: dict[str, Any] = self.fields
        # The line log.info below would write, when every value is plain (a stream's has
        # `messages` too, and goes through logging).
        if (
            self.plain
            and tenant_plain
            and run_plain
            and len(known) == 2
            and ACCESS.write(
                self.method, code, tenant, run, elapsed, known["request_id"], known["caller"]
            )
        ):
            return
        fields: dict[str, object] = {
            "method": self.method,
            "code": code,
            "tenant": tenant,
            "run": run,
            "latency_ms": round(elapsed * 1000, 2),
        }
        if not tenant_plain:
            logs.untrusted(fields, "tenant", tenant)
        if not run_plain:
            logs.untrusted(fields, "run", run)
        fields.update(known)
        log.info("rpc", extra=fields)


# The forms a field is logged in as it is (one fullmatch each); anything else goes through
# logs.untrusted. The request fields' forms are validation's own.
_TENANT_ID = validation.valid("tenant_id")
_RUN_ID = validation.valid("run_id")
_IDENTITY = re.compile(r"[!-~]{1,128}", re.ASCII).fullmatch  # printable ASCII, no space
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}", re.ASCII).fullmatch
# Plain: what a JSON string holds as it is, as the encoder would write it (printable ASCII but
# " and \). Validated tenant and run ids, request ids and our own names are plain.
_PLAIN = re.compile(r"[!#-\[\]-~]{1,128}", re.ASCII).fullmatch
ACCESS = logs.AccessLog(log, "rpc")


@functools.lru_cache(maxsize=1024)
def _plain(identity: str) -> bool:
    """Whether a caller's identity is plain; asked on every call, of a few identities."""
    return _PLAIN(identity) is not None


# New request ids: this process's random prefix and a counter; unique across replicas and
# restarts without a random draw per call.
_ID_PREFIX = secrets.token_hex(6)
_ids = itertools.count(1)


def _request_id(sent: object, fields: dict[str, object]) -> None:
    """Set `request_id` from the x-request-id the caller sent (to correlate with its logs):
    kept when it has the form _REQUEST_ID, else a new one, and the rejected one named only by
    its length and digest, with `request_id_rejected`. (With none sent, `admit` makes one.)"""
    if isinstance(sent, str) and _REQUEST_ID(sent):
        fields["request_id"] = sent
        return
    fields["request_id"] = f"{_ID_PREFIX}-{next(_ids):x}"
    fields["request_id_rejected"] = True
    text = sent if isinstance(sent, str) else repr(sent)
    fields["request_id_sent_chars"] = len(text)
    fields["request_id_sent_sha256"] = logs.digest(text)


class CallCap:
    """The server's limit on unary calls that came without a deadline: one watchdog cancels
    the calls past it, `tick` seconds late at most. (A timer per call, as asyncio.timeout
    sets, cost about 30 µs of the 400 µs a cached IssueCredentials takes under load: every
    call leaves a cancelled timer in the loop's heap.)

    `_deadlines`: the handler task of each capped call under way → when it must end; added
    and removed by the calls, and removed by `watch` when it cancels one (into `_cut`, until
    the call asks `cut`)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.tick = min(1.0, seconds / 20)
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._cut: set[asyncio.Task[Any]] = set()

    def enter(self) -> asyncio.Task[Any] | None:
        """Watch the call of the current task (None, and not watched, outside a task)."""
        task = asyncio.current_task()
        if task is not None:
            self._deadlines[task] = time.monotonic() + self.seconds
        return task

    def leave(self, task: asyncio.Task[Any] | None) -> None:
        """Stop watching the call (and take back a cut it did not hear of)."""
        self._deadlines.pop(task, None)  # type: ignore[arg-type]
        if self._cut:
            self.cut(task)

    def cut(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether the cap cancelled the call (asked on its CancelledError); if so, the
        cancellation is taken back, so the call can still answer DEADLINE_EXCEEDED."""
        if task is None or task not in self._cut:
            return False
        self._cut.discard(task)
        task.uncancel()
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            late = [task for task, deadline in self._deadlines.items() if deadline <= now]
            for task in late:
                del self._deadlines[task]
                self._cut.add(task)
                task.cancel()


def unary(handler: Handler) -> Handler:
    """Run a unary handler as a `_Call`, within the server's cap when it has no deadline."""
    method = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: CredentialBrokerService, request: Any, context: Any) -> Any:
        call = _Call(method, request, context)
        try:
            call.admit(self.guard)
            if context.time_remaining() is not None:
                return await handler(self, request, context)
            cap = self.cap
            capped = cap.enter()
            try:
                return await handler(self, request, context)
            except asyncio.CancelledError:
                if cap.cut(capped):
                    raise DeadlineExceeded(
                        f"the call took longer than the server's limit of {cap.seconds} s"
                    ) from None
                raise
            finally:
                cap.leave(capped)
        except asyncio.CancelledError:  # the caller went away
            call.code = "CANCELLED"
            raise
        except Exception as exc:
            await call.fail(exc)
            raise
        finally:
            call.finish(self.metrics, self.log_ok)

    return wrapper  # type: ignore[return-value]


def streaming(handler: Handler) -> Handler:
    """Run a server-streaming handler as a `_Call`, counting the messages sent."""
    method = handler.__name__

    @functools.wraps(handler)
    async def wrapper(
        self: CredentialBrokerService, request: Any, context: Any
    ) -> AsyncIterator[Any]:
        call = _Call(method, request, context)
        sent = 0
        try:
            call.admit(self.guard)
            async for message in handler(self, request, context):
                yield message
                sent += 1
                call.fields["messages"] = sent
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away
            call.code = "CANCELLED"
            raise
        except Exception as exc:
            await call.fail(exc)
            raise
        finally:
            call.finish(self.metrics, self.log_ok)

    return wrapper  # type: ignore[return-value]


def _code_name(exc: Exception) -> str:
    if isinstance(exc, BrokerError):
        return next(code.name for kind, code in STATUS_OF if isinstance(exc, kind))
    return "INTERNAL"


def _timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    # Whole microseconds from the aware datetime (Timestamp.FromDatetime is slower).
    micros = (moment - _EPOCH) // _MICROSECOND
    return timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _checks_pb(checks: tuple[Check, ...]) -> list[pb.Check]:
    return [pb.Check(name=c.name, passed=c.passed, detail=c.detail) for c in checks]


def credentials_pb(credentials: Credentials, region: str) -> pb.Credentials:
    return pb.Credentials(
        access_key_id=credentials.access_key_id,
        secret_access_key=credentials.secret_access_key,
        session_token=credentials.session_token,
        expiration=_timestamp(credentials.expiration),
        region=region,
        assumed_role_arn=credentials.assumed_role_arn,
    )


class CredentialBrokerService(broker_pb2_grpc.CredentialBrokerServicer):
    """The gRPC face of the broker. Holds no state of its own."""

    def __init__(
        self,
        connections: Connections,
        cache: CredentialCache,
        hub: StreamHub,
        limits: Limits,
        *,
        guard: Guard,
        metrics: Metrics,
        refresh_margin: float,
        max_call_seconds: float,
        rpc_log: str = "all",
    ) -> None:
        self._connections = connections
        self._cache = cache
        self._hub = hub
        self._limits = limits
        self._refresh_margin = refresh_margin
        self.guard = guard
        self.metrics = metrics
        self.cap = CallCap(max_call_seconds)
        self.log_ok = rpc_log == "all"

    def connection_pb(self, connection: Connection) -> pb.Connection:
        settings = self._connections.settings
        return pb.Connection(
            tenant_id=connection.tenant_id,
            status=STATUS_PB[connection.status],
            external_id=connection.external_id,
            quick_create_url=self._connections.link(connection),
            template_url=settings.template_url,
            trusted_principal_arn=settings.trusted_principal_arn,
            role_arn=connection.role_arn,
            account_id=connection.account_id,
            created_at=_timestamp(connection.created_at),
            verified_at=_timestamp(connection.verified_at),
            disconnected_at=_timestamp(connection.disconnected_at),
            checks=_checks_pb(connection.checks),
            region=connection.region,
            guidance=guidance(connection, settings.session_duration),
            stack_name=stack_name(connection.tenant_id, connection.external_id),
        )

    @unary
    async def CreateConnection(
        self, request: pb.CreateConnectionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateConnectionResponse:
        tenant_id = validation.field("tenant_id", request.tenant_id)
        region = validation.field("region", request.region, optional=True)
        caller = CALLER.get().identity
        connection = await self._connections.create(
            tenant_id, region, caller, admit=lambda: self._limits.new_tenant(caller)
        )
        return pb.CreateConnectionResponse(connection=self.connection_pb(connection))

    @unary
    async def VerifyRole(
        self, request: pb.VerifyRoleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.VerifyRoleResponse:
        tenant_id = validation.field("tenant_id", request.tenant_id)
        role_arn = validation.field("role_arn", request.role_arn)
        time_left = context.time_remaining()
        with self._limits.verifying(tenant_id):
            connection = await self._connections.verify(
                tenant_id,
                role_arn,
                self.cap.seconds if time_left is None else time_left,
                CALLER.get().identity,
            )
        return pb.VerifyRoleResponse(connection=self.connection_pb(connection))

    @unary
    async def GetConnection(
        self, request: pb.GetConnectionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetConnectionResponse:
        tenant_id = validation.field("tenant_id", request.tenant_id)
        connection = await self._connections.get(tenant_id)
        return pb.GetConnectionResponse(connection=self.connection_pb(connection))

    @unary
    async def IssueCredentials(
        self, request: pb.IssueCredentialsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.IssueCredentialsResponse:
        tenant_id = validation.field("tenant_id", request.tenant_id)
        run_id = validation.field("run_id", request.run_id)
        # A cache hit under a grant read moments ago is found with no await in between, so no
        # change to the connection can come between the two (what `_current` checks for).
        grant = self._connections.fresh_grant(tenant_id, run_id)
        credentials = None if grant is None else self._cache.fresh(grant)
        if grant is None or credentials is None:
            grant, credentials = await self._current(tenant_id, run_id)
        # Made once per credentials and region, then sent as often as they are asked for.
        key = (pb.IssueCredentialsResponse, grant.region)
        response = credentials.encoded.get(key)
        if not isinstance(response, pb.IssueCredentialsResponse):
            response = pb.IssueCredentialsResponse(
                credentials=credentials_pb(credentials, grant.region)
            )
            credentials.encoded[key] = response
        return response

    async def _current(
        self, tenant_id: str, run_id: str, newer_than: str | None = None
    ) -> tuple[Grant, Credentials]:
        """The run's grant and its credentials (with `newer_than`, other than those), with no
        change to the tenant's connection made or heard here while they were fetched: a
        Disconnect or role change acknowledged while STS was answering is never followed by
        credentials of the old grant. Fetched again when it moved, or when the grant changed
        under a mint (GrantChanged)."""
        for _ in range(STALE_GRANT_RETRIES):
            generation = self._connections.generation(tenant_id)
            grant = await self._connections.grant(tenant_id, run_id)
            try:
                credentials = await self._cache.get(grant, newer_than=newer_than)
            except GrantChanged:
                continue
            if self._connections.generation(tenant_id) == generation:
                return grant, credentials
        raise Aborted(f"the connection of tenant {tenant_id!r} kept changing; retry")

    @streaming
    async def WatchCredentials(
        self, request: pb.WatchCredentialsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchCredentialsResponse]:
        tenant_id = validation.field("tenant_id", request.tenant_id)
        run_id = validation.field("run_id", request.run_id)
        # Within the caller's and the tenant's share of streams, held until the stream ends.
        with self._limits.stream(CALLER.get().identity, tenant_id):
            # Subscribed before the grant is first read, so a Disconnect or role change from
            # here on reaches this stream (ends or wakes it) whatever it is waiting for.
            subscription = self._hub.subscribe((tenant_id, run_id))
            renewal = False  # the first message is the current credentials; later ones renew
            try:
                async for grant, credentials in watch(
                    subscription,
                    lambda newer_than: self._current(tenant_id, run_id, newer_than),
                    refresh_margin=self._refresh_margin,
                ):
                    yield pb.WatchCredentialsResponse(
                        credentials=credentials_pb(credentials, grant.region)
                    )
                    if renewal:
                        self.metrics.renewals.labels("ok").inc()
                    renewal = True
            finally:
                self._hub.unsubscribe(subscription)

    @unary
    async def ReleaseCredentials(
        self, request: pb.ReleaseCredentialsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReleaseCredentialsResponse:
        tenant_id = validation.field("tenant_id", request.tenant_id)
        run_id = validation.field("run_id", request.run_id)
        self._cache.release(tenant_id, run_id)
        released = StreamEnded(
            f"run {run_id!r} was released",
            subject=run_id,
            reason="RUN_RELEASED",
            metadata={"tenant_id": tenant_id, "run_id": run_id},
        )
        self._hub.end_run((tenant_id, run_id), released)
        return pb.ReleaseCredentialsResponse()

    @unary
    async def Disconnect(
        self, request: pb.DisconnectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DisconnectResponse:
        tenant_id = validation.field("tenant_id", request.tenant_id)
        connection = await self._connections.disconnect(tenant_id, CALLER.get().identity)
        return pb.DisconnectResponse(connection=self.connection_pb(connection))

    @unary
    async def ListConnectionEvents(
        self, request: pb.ListConnectionEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListConnectionEventsResponse:
        tenant_id = validation.field("tenant_id", request.tenant_id)
        if not 0 <= request.page_size <= MAX_EVENTS:
            raise InvalidArgument("page_size", f"must be 1-{MAX_EVENTS}, or 0 for 20")
        events = await self._connections.events(tenant_id, request.page_size or 20)
        return pb.ListConnectionEventsResponse(
            events=[
                pb.ConnectionEvent(
                    tenant_id=e.tenant_id,
                    kind=e.kind,
                    at=_timestamp(e.at),
                    actor=e.actor,
                    role_arn=e.role_arn,
                    external_id=e.external_id,
                    checks=_checks_pb(e.checks),
                )
                for e in events
            ]
        )
