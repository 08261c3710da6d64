"""VerifyRole against an STS that enforces trust policies: each way a role can be wrong."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker.emulator import CUSTOMER_ACCOUNT, Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running, StsLog, connect, start_broker


def make_role(local_aws: LocalAws, name: str, statement: dict[str, Any]) -> str:
    iam = local_aws.client("iam", CUSTOMER_ACCOUNT)
    document = {"Version": "2012-10-17", "Statement": [statement]}
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(document))
    return str(role["Role"]["Arn"])


def trusting(principal: str, condition: dict[str, Any] | None = None) -> dict[str, Any]:
    statement: dict[str, Any] = {
        "Effect": "Allow",
        "Principal": {"AWS": principal},
        "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
    }
    if condition:
        statement["Condition"] = condition
    return statement


async def verify_fails(running: Running, tenant: str, role_arn: str) -> dict[str, Any]:
    """VerifyRole must fail FAILED_PRECONDITION; returns the checks and violations it reported."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await running.stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(failed.value)
    assert status is not None
    failure = error_details_pb2.PreconditionFailure()
    assert status.details[0].Unpack(failure)
    stored = await running.stub.GetConnection(pb.GetConnectionRequest(tenant_id=tenant))
    assert stored.connection.status == pb.CONNECTION_STATUS_PENDING
    return {
        "message": failed.value.details(),
        "violations": {v.subject: v.description for v in failure.violations},
        "checks": {c.name: c.passed for c in stored.connection.checks},
    }


async def pending(running: Running, tenant: str) -> pb.Connection:
    created = await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    return created.connection


async def test_role_assumable_without_external_id_is_refused(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    connection = await pending(running, tenant)
    role = make_role(local_aws, f"open-{tenant}", trusting(connection.trusted_principal_arn))
    result = await verify_fails(running, tenant, role)
    assert result["checks"] == {
        "role_arn_format": True,
        "role_not_used_by_another_tenant": True,
        "assume_with_external_id": True,
        "assume_without_external_id_denied": False,
        "assume_with_other_external_id_denied": False,
        "trust_policy_requires_external_id": False,
    }
    assert "confused deputy" in result["violations"]["assume_without_external_id_denied"]
    assert connection.external_id in result["violations"]["assume_without_external_id_denied"]


async def test_role_with_another_external_id_is_refused(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    connection = await pending(running, tenant)
    condition = {"StringEquals": {"sts:ExternalId": "someone-elses-external-id-0123456789"}}
    role = make_role(
        local_aws, f"other-{tenant}", trusting(connection.trusted_principal_arn, condition)
    )
    result = await verify_fails(running, tenant, role)
    assert result["checks"]["assume_with_external_id"] is False
    assert result["checks"]["assume_without_external_id_denied"] is True
    detail = result["violations"]["assume_with_external_id"]
    assert "AWS denied sts:AssumeRole" in detail
    assert connection.external_id in detail


async def test_role_that_does_not_exist_is_refused_after_a_bounded_wait(
    running: Running, tenant: str
) -> None:
    await pending(running, tenant)
    result = await verify_fails(running, tenant, f"arn:aws:iam::{CUSTOMER_ACCOUNT}:role/missing")
    assert result["checks"]["assume_with_external_id"] is False
    assert result["checks"]["trust_policy_requires_external_id"] is False


async def test_role_trusting_another_principal_is_refused(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    connection = await pending(running, tenant)
    condition = {"StringEquals": {"sts:ExternalId": connection.external_id}}
    role = make_role(
        local_aws, f"stranger-{tenant}", trusting("arn:aws:iam::333333333333:root", condition)
    )
    result = await verify_fails(running, tenant, role)
    assert result["checks"]["assume_with_external_id"] is False


async def test_role_without_session_tagging_is_refused(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    """Runs' sessions are tagged, which AWS allows only with sts:TagSession: verify says so."""
    connection = await pending(running, tenant)
    statement = trusting(
        connection.trusted_principal_arn,
        {"StringEquals": {"sts:ExternalId": connection.external_id}},
    )
    statement["Action"] = ["sts:AssumeRole"]
    role = make_role(local_aws, f"notags-{tenant}", statement)
    result = await verify_fails(running, tenant, role)
    assert result["checks"]["assume_with_external_id"] is False
    assert "sts:TagSession" in result["violations"]["assume_with_external_id"]


async def test_role_that_stops_trusting_us_ends_issuance(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    connection = await connect(running, local_aws, tenant)
    request = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r")
    await running.stub.IssueCredentials(request)
    assert len(running.broker.cache) == 1
    iam = local_aws.client("iam", CUSTOMER_ACCOUNT)
    iam.update_assume_role_policy(
        RoleName=connection.role_arn.rsplit("/", 1)[1],
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [trusting("arn:aws:iam::333333333333:root")]}
        ),
    )
    await running.stub.ReleaseCredentials(
        pb.ReleaseCredentialsRequest(tenant_id=tenant, run_id="r")
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.IssueCredentials(request)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "can no longer be assumed" in (refused.value.details() or "")
    assert "VerifyRole" in (refused.value.details() or "")
    assert len(running.broker.cache) == 0


async def test_role_created_seconds_ago_is_retried_until_iam_propagates(
    local_aws: LocalAws,
    tenant: str,
    broker_settings: dict[str, Any],
    broker_identity: Identity,
    sts_log: StsLog,
) -> None:
    """IAM is eventually consistent: a new role may refuse AssumeRole for a while. VerifyRole
    retries within BROKER_VERIFY_WAIT instead of failing the customer at once."""
    local_aws.sts.propagation_delay = 2.0
    async with start_broker(broker_settings | {"verify_wait": 15.0}, broker_identity) as running:
        created = await pending(running, tenant)
        role_arn = local_aws.create_customer_stack(created.quick_create_url)
        verified = await running.stub.VerifyRole(
            pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn), timeout=30
        )
    assert verified.connection.status == pb.CONNECTION_STATUS_ACTIVE
    tries = [
        c for c in sts_log.now() if c.role_arn == role_arn and c.external_id == created.external_id
    ]
    assert not tries[0].allowed, "the first try met a role IAM had not propagated yet"
    assert tries[-1].allowed


async def test_verify_wait_is_bounded_by_the_callers_deadline(
    local_aws: LocalAws, tenant: str, broker_settings: dict[str, Any], broker_identity: Identity
) -> None:
    async with start_broker(broker_settings | {"verify_wait": 60.0}, broker_identity) as running:
        await pending(running, tenant)
        role = f"arn:aws:iam::{CUSTOMER_ACCOUNT}:role/never-there"
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await running.stub.VerifyRole(
                pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role), timeout=4
            )
    # The broker gives up in time to answer, rather than letting the deadline expire.
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
