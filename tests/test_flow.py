"""The whole flow, through the real gRPC stack, against the local AWS emulator."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from broker.emulator import LocalAws
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running, StsLog, connect


def link_params(url: str) -> dict[str, str]:
    split = urlsplit(url)
    params = {k: v[0] for k, v in parse_qs(split.fragment.partition("?")[2]).items()}
    params["region"] = parse_qs(split.query)["region"][0]
    return params


async def test_create_connect_issue_watch_release_disconnect(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    stub = running.stub
    created = (await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))).connection
    assert created.status == pb.CONNECTION_STATUS_PENDING
    assert len(created.external_id) >= 32
    params = link_params(created.quick_create_url)
    assert created.quick_create_url.startswith(
        "https://console.aws.amazon.com/cloudformation/home?region=us-east-1#/stacks/quickcreate?"
    )
    assert params["param_ExternalId"] == created.external_id
    assert params["templateURL"] == created.template_url
    # Whom the role trusts is in the published template, never in the (editable) link.
    assert set(params) == {"region", "templateURL", "stackName", "param_ExternalId"}

    again = (await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))).connection
    assert again.external_id == created.external_id, "PENDING: the same link again"

    role_arn = local_aws.create_customer_stack(created.quick_create_url)
    verified = (
        await stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))
    ).connection
    assert verified.status == pb.CONNECTION_STATUS_ACTIVE
    assert verified.account_id == role_arn.split(":")[4]
    assert [(c.name, c.passed) for c in verified.checks] == [
        ("role_arn_format", True),
        ("role_not_used_by_another_tenant", True),
        ("assume_with_external_id", True),
        ("assume_without_external_id_denied", True),
        ("assume_with_other_external_id_denied", True),
        ("trust_policy_requires_external_id", True),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as exists:
        await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS

    first = (
        await stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run-a"))
    ).credentials
    same = (
        await stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run-a"))
    ).credentials
    other = (
        await stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run-b"))
    ).credentials
    assert same.access_key_id == first.access_key_id
    assert other.access_key_id != first.access_key_id
    assert first.assumed_role_arn.endswith("/run-a")
    assert first.region == "us-east-1"

    # The credentials work, as the customer's role, in the customer's account.
    as_run = local_aws.client(
        "sts",
        aws_access_key_id=first.access_key_id,
        aws_secret_access_key=first.secret_access_key,
        aws_session_token=first.session_token,
    )
    identity = as_run.get_caller_identity()
    assert identity["Account"] == verified.account_id
    assert identity["Arn"] == first.assumed_role_arn

    watch = stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="run-a"))
    streamed = await watch.read()
    assert streamed.credentials.access_key_id == first.access_key_id

    await stub.ReleaseCredentials(pb.ReleaseCredentialsRequest(tenant_id=tenant, run_id="run-a"))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await watch.read()
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "released" in (ended.value.details() or "")

    after_release = (
        await stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run-a"))
    ).credentials
    assert after_release.access_key_id != first.access_key_id, "a released run starts afresh"

    watch_b = stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="run-b"))
    await watch_b.read()
    gone = (await stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))).connection
    assert gone.status == pb.CONNECTION_STATUS_DISCONNECTED
    assert "delete the CloudFormation stack" in gone.guidance
    with pytest.raises(grpc.aio.AioRpcError) as stream_gone:
        await watch_b.read()
    assert stream_gone.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run-b"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    fresh = (await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))).connection
    assert fresh.status == pb.CONNECTION_STATUS_PENDING
    assert fresh.external_id != created.external_id, "after Disconnect: a new external ID"


async def test_every_assume_role_names_the_run(
    running: Running, local_aws: LocalAws, tenant: str, sts_log: StsLog
) -> None:
    await connect(running, local_aws, tenant)
    run_id = "batch/2026-11-27:job=7"
    issued = await running.stub.IssueCredentials(
        pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run_id)
    )
    call = sts_log.now()[-1]
    assert call.allowed
    assert call.tags == {"tenant": tenant, "run": run_id}
    assert call.session_name == call.source_identity
    assert call.session_name.startswith("batch-2026-11-27-job=7-")
    assert len(call.session_name) <= 64
    assert call.policy_arns == ["arn:aws:iam::aws:policy/ReadOnlyAccess"]
    assert call.duration == 3600
    assert issued.credentials.assumed_role_arn.endswith("/" + call.session_name)


async def test_concurrent_misses_for_one_run_make_one_sts_call(
    running: Running, local_aws: LocalAws, tenant: str, sts_log: StsLog
) -> None:
    await connect(running, local_aws, tenant)
    before = len(sts_log.now())
    request = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="crowded")
    answers = await asyncio.gather(*(running.stub.IssueCredentials(request) for _ in range(50)))
    assert len({a.credentials.access_key_id for a in answers}) == 1
    made = [c for c in sts_log.now()[before:] if c.session_name == "crowded"]
    assert len(made) == 1


async def test_role_change_stops_serving_the_old_roles_credentials(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    connection = await connect(running, local_aws, tenant)
    request = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r1")
    old = (await running.stub.IssueCredentials(request)).credentials
    # The customer makes a second stack (another role) and points the connection at it.
    url = connection.quick_create_url.replace("stackName=credential-broker-", "stackName=second-")
    new_role = local_aws.create_customer_stack(url)
    await running.stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=new_role))
    new = (await running.stub.IssueCredentials(request)).credentials
    assert new.access_key_id != old.access_key_id
    assert new_role.rsplit("/", 1)[1] in new.assumed_role_arn
