"""Every malformed field of every RPC is INVALID_ARGUMENT naming the field; the server keeps
serving. No input reaches INTERNAL."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running, connect, start_broker

BAD_IDS = [
    "",
    " ",
    "-leading-dash",
    "has space",
    "x" * 129,
    "ünïcode",
    "a\x00b",
    "../../etc",
    "a;b",
]
BAD_ROLE_ARNS = [
    "",
    "arn:aws:iam::12345:role/short-account",
    "arn:aws:iam::123456789012:user/not-a-role",
    "arn:aws:s3:::bucket",
    "arn:evil:iam::123456789012:role/x",
    "arn:aws:iam::123456789012:role/" + "n" * 65,
    "arn:aws:iam::123456789012:role/with space",
]
BAD_REGIONS = ["US-EAST-1", "mars-1", "us-east-1; drop", "x" * 40]

# (RPC, request type, the fields it takes, the field to break)
CASES: list[tuple[str, Any, dict[str, str], str, list[str]]] = []
GOOD = {"tenant_id": "acme", "run_id": "run-1", "role_arn": "arn:aws:iam::222222222222:role/r"}
for rpc, request, fields in [
    ("CreateConnection", pb.CreateConnectionRequest, ["tenant_id"]),
    ("VerifyRole", pb.VerifyRoleRequest, ["tenant_id", "role_arn"]),
    ("GetConnection", pb.GetConnectionRequest, ["tenant_id"]),
    ("IssueCredentials", pb.IssueCredentialsRequest, ["tenant_id", "run_id"]),
    ("WatchCredentials", pb.WatchCredentialsRequest, ["tenant_id", "run_id"]),
    ("ReleaseCredentials", pb.ReleaseCredentialsRequest, ["tenant_id", "run_id"]),
    ("Disconnect", pb.DisconnectRequest, ["tenant_id"]),
    ("ListConnectionEvents", pb.ListConnectionEventsRequest, ["tenant_id"]),
]:
    for broken in fields:
        values = BAD_ROLE_ARNS if broken == "role_arn" else BAD_IDS
        CASES.append((rpc, request, {f: GOOD[f] for f in fields}, broken, values))
CASES.append(
    ("CreateConnection", pb.CreateConnectionRequest, {"tenant_id": "acme"}, "region", BAD_REGIONS)
)
CASES.append(
    (
        "ListConnectionEvents",
        pb.ListConnectionEventsRequest,
        {"tenant_id": "acme"},
        "page_size",
        [-1, 101, 2**31 - 1],  # type: ignore[list-item]
    )
)


async def first_answer(call: Any) -> Any:
    """The response of a unary call, or the first message of a stream."""
    return await call.read() if hasattr(call, "read") else await call


@pytest.mark.parametrize(
    ("rpc", "request_type", "good", "broken", "values"),
    CASES,
    ids=[f"{c[0]}.{c[3]}" for c in CASES],
)
async def test_malformed_field_is_invalid_argument(
    running: Running,
    rpc: str,
    request_type: Any,
    good: dict[str, str],
    broken: str,
    values: list[str],
) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    for value in values:
        request = request_type(**(good | {broken: value}))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await first_answer(getattr(running.stub, rpc)(request))
        error = failed.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, broken, value)
        assert (error.details() or "").startswith(f"{broken}: "), error.details()
        status = rpc_status.from_call(error)
        assert status is not None
        bad_request = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad_request)
        assert [v.field for v in bad_request.field_violations] == [broken]
    answer = await health.Check(health_pb2.HealthCheckRequest(service="broker.v1.CredentialBroker"))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_unknown_tenant_is_not_found_and_never_internal(running: Running) -> None:
    for rpc, request in [
        ("GetConnection", pb.GetConnectionRequest(tenant_id="nobody")),
        ("VerifyRole", pb.VerifyRoleRequest(tenant_id="nobody", role_arn=GOOD["role_arn"])),
        ("IssueCredentials", pb.IssueCredentialsRequest(tenant_id="nobody", run_id="r")),
        ("Disconnect", pb.DisconnectRequest(tenant_id="nobody")),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await getattr(running.stub, rpc)(request)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND, rpc
    released = await running.stub.ReleaseCredentials(
        pb.ReleaseCredentialsRequest(tenant_id="nobody", run_id="r")
    )
    assert released == pb.ReleaseCredentialsResponse()


async def test_oversized_request_is_refused_and_server_keeps_serving(running: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await running.stub.GetConnection(pb.GetConnectionRequest(tenant_id="x" * 200_000))
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as after:
        await running.stub.GetConnection(pb.GetConnectionRequest(tenant_id="still-here"))
    assert after.value.code() == grpc.StatusCode.NOT_FOUND


async def test_calls_without_a_deadline_are_capped(
    local_aws: LocalAws, tenant: str, broker_settings: dict[str, Any], broker_identity: Identity
) -> None:
    async with start_broker(
        broker_settings | {"max_call_seconds": 1.0}, broker_identity
    ) as running:
        await connect(running, local_aws, tenant)
        local_aws.sts.latency = 3.0
        request = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="slow")
        with pytest.raises(grpc.aio.AioRpcError) as capped:
            await running.stub.IssueCredentials(request)  # no deadline
        assert capped.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "limit of 1.0 s" in (capped.value.details() or "")
        local_aws.sts.latency = 0.0
        # A caller's own deadline, when it has one, is the one that counts.
        answer = await running.stub.IssueCredentials(request, timeout=10)
        assert answer.credentials.access_key_id
