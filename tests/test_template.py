"""The customer's template trusts the principal it was made for and nobody else: nothing in a
quick-create link (which anyone can edit) can change whom the customer's role trusts. Checked
on the rendered text, under cfn-lint, and by creating stacks from real and tampered links in the
emulator (moto with trust policies enforced) and verifying them through the real broker."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlencode, urlsplit

import grpc
import pytest
from cfnlint.decode.cfn_yaml import loads

from broker.connections import new_external_id
from broker.emulator import CUSTOMER_ACCOUNT, TEMPLATE_BUCKET, LocalAws
from broker.template import stack_name, template_body
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running
from tests.processes import BIN

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "cloudformation" / "customer-role.yaml"
# The principal deploy/cloudformation/customer-role.yaml is rendered for.
EXAMPLE_PRINCIPAL = "arn:aws:iam::123456789012:role/credential-broker"
ATTACKER_ACCOUNT = "333333333333"
PRINCIPALS = [
    EXAMPLE_PRINCIPAL,
    "arn:aws:iam::123456789012:role/platform/prod/credential-broker",
    "arn:aws:iam::123456789012:user/credential-broker",
    "arn:aws-cn:iam::123456789012:role/credential-broker",
    "arn:aws-us-gov:iam::123456789012:role/credential-broker",
]


def parsed(template: str) -> dict[str, Any]:
    """The template as CloudFormation reads it (!Ref → {"Ref": …}), as plain JSON values."""
    result: dict[str, Any] = json.loads(json.dumps(loads(template)))
    return result


@pytest.mark.parametrize("principal", PRINCIPALS)
def test_the_rendered_template_trusts_exactly_its_principal_with_the_external_id(
    principal: str,
) -> None:
    template = parsed(template_body(principal))
    assert set(template["Parameters"]) == {"ExternalId"}, "no free trust parameter"
    role = template["Resources"]["BrokerReadOnlyRole"]["Properties"]
    (statement,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert statement["Effect"] == "Allow"
    assert statement["Principal"] == {"AWS": principal}
    assert statement["Condition"] == {"StringEquals": {"sts:ExternalId": {"Ref": "ExternalId"}}}
    assert set(statement["Action"]) == {
        "sts:AssumeRole",
        "sts:TagSession",
        "sts:SetSourceIdentity",
    }
    assert "TrustedPrincipalArn" not in template_body(principal)


def test_the_external_id_parameter_admits_exactly_what_the_broker_issues() -> None:
    declared = parsed(template_body(EXAMPLE_PRINCIPAL))["Parameters"]["ExternalId"]
    pattern = declared["AllowedPattern"]  # CloudFormation matches the whole value
    issued = [new_external_id() for _ in range(2000)]
    for external_id in issued:
        assert re.fullmatch(pattern, external_id), external_id
        assert declared["MinLength"] <= len(external_id) <= declared["MaxLength"]
    assert {len(external_id) for external_id in issued} == {32}
    assert set("".join(issued)) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    for wrong in ("*", "", "a" * 31, "a" * 33, "a" * 31 + "=", "a" * 31 + "/", "a" * 31 + "*"):
        assert not re.fullmatch(pattern, wrong), wrong


@pytest.mark.parametrize(
    "principal",
    [
        "*",
        "arn:aws:iam::123456789012:root",
        "arn:aws:iam::*:role/credential-broker",
        "arn:aws:iam::123456789012:role/*",
        "arn:aws:iam::123456789012:role/credential-*",
        "arn:aws:iam::123456789012:role/",
        "arn:aws:iam::12345678901:role/credential-broker",
        "arn:aws:iam::1234567890123:role/credential-broker",
        "arn:aws-iso:iam::123456789012:role/credential-broker",
        "arn:aws:iam::123456789012:group/credential-broker",
        "arn:aws:sts::123456789012:assumed-role/credential-broker/session",
        'arn:aws:iam::123456789012:role/x"\n      Evil: true',
        "arn:aws:iam::123456789012:role/credential-broker\n",
        " arn:aws:iam::123456789012:role/credential-broker",
        "123456789012",
    ],
)
def test_the_template_refuses_a_principal_customers_must_not_trust(principal: str) -> None:
    with pytest.raises(ValueError, match="is not an IAM role or user ARN"):
        template_body(principal)


def test_the_published_example_is_the_rendered_template() -> None:
    done = subprocess.run(
        [str(BIN / "broker"), "template", "--trusted-principal-arn", EXAMPLE_PRINCIPAL],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == EXAMPLE.read_bytes(), "regenerate it with `broker template`"


def test_rendered_templates_pass_cfn_lint(tmp_path: Path) -> None:
    files = []
    for number, principal in enumerate(PRINCIPALS):
        path = tmp_path / f"customer-role-{number}.yaml"
        path.write_text(template_body(principal))
        files.append(str(path))
    done = subprocess.run(
        [str(BIN / "cfn-lint"), *files], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def trust_policy(local_aws: LocalAws, role_arn: str) -> dict[str, Any]:
    iam = local_aws.client("iam", CUSTOMER_ACCOUNT)
    role = iam.get_role(RoleName=role_arn.rpartition("/")[2])["Role"]
    document: dict[str, Any] = role["AssumeRolePolicyDocument"]
    return document


def tampered(url: str, **params: str) -> str:
    """`url` with link parameters replaced or added, as anyone holding the link can."""
    page, _, fragment = url.partition("#")
    route, _, query = fragment.partition("?")
    values = dict(parse_qsl(query)) | params
    return f"{page}#{route}?{urlencode(values, quote_via=quote)}"


async def test_the_link_never_names_a_principal(running: Running, tenant: str) -> None:
    for region in ("us-east-1", "cn-north-1", "us-gov-west-1"):
        request = pb.CreateConnectionRequest(tenant_id=f"{tenant}-{region}", region=region)
        link = (await running.stub.CreateConnection(request)).connection.quick_create_url
        fragment = parse_qs(urlsplit(link).fragment.partition("?")[2])
        assert set(fragment) == {"templateURL", "stackName", "param_ExternalId"}, link
        assert "Principal" not in link


async def test_a_link_naming_another_principal_still_makes_a_role_only_the_broker_assumes(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    created = await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    connection = created.connection
    attacker = local_aws.create_user(f"attacker-{tenant}", account=ATTACKER_ACCOUNT)
    link = tampered(connection.quick_create_url, param_TrustedPrincipalArn=attacker.arn)

    role_arn = local_aws.create_customer_stack(link)

    (statement,) = trust_policy(local_aws, role_arn)["Statement"]
    assert statement["Principal"] == {"AWS": connection.trusted_principal_arn}
    assert statement["Condition"] == {"StringEquals": {"sts:ExternalId": connection.external_id}}
    sts = local_aws.client(
        "sts",
        aws_access_key_id=attacker.access_key_id,
        aws_secret_access_key=attacker.secret_access_key,
    )
    with pytest.raises(sts.exceptions.ClientError, match="AccessDenied"):
        sts.assume_role(
            RoleArn=role_arn, RoleSessionName="attacker", ExternalId=connection.external_id
        )
    verified = await running.stub.VerifyRole(
        pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn)
    )
    assert verified.connection.status == pb.CONNECTION_STATUS_ACTIVE


async def test_a_link_with_another_external_id_makes_a_role_that_fails_verification(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    created = await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    other_id = new_external_id()
    link = tampered(created.connection.quick_create_url, param_ExternalId=other_id)
    role_arn = local_aws.create_customer_stack(link)
    (statement,) = trust_policy(local_aws, role_arn)["Statement"]
    assert statement["Condition"] == {"StringEquals": {"sts:ExternalId": other_id}}

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await running.stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "AWS denied sts:AssumeRole" in (failed.value.details() or "")
    current = await running.stub.GetConnection(pb.GetConnectionRequest(tenant_id=tenant))
    assert current.connection.status == pb.CONNECTION_STATUS_PENDING


@pytest.mark.parametrize("external_id", ["*", "short", "a" * 31 + "=", "a" * 33])
async def test_a_link_with_a_malformed_external_id_creates_no_stack(
    running: Running, local_aws: LocalAws, tenant: str, external_id: str
) -> None:
    created = await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    link = tampered(created.connection.quick_create_url, param_ExternalId=external_id)
    with pytest.raises(ValueError, match="Parameter 'ExternalId' must match pattern"):
        local_aws.create_customer_stack(link)


async def test_the_emulator_builds_the_stack_from_the_template_at_the_link(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    """As the console does: the stack comes from the object templateURL names, so what tests
    create is what was published (a different object gives a different role)."""
    created = await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    elsewhere = f"arn:aws:iam::{ATTACKER_ACCOUNT}:role/not-the-broker"
    key = f"other-{tenant}.yaml"
    local_aws.client("s3").put_object(
        Bucket=TEMPLATE_BUCKET, Key=key, Body=template_body(elsewhere).encode()
    )
    other_url = f"{local_aws.endpoint_url}/{TEMPLATE_BUCKET}/{key}"
    link = tampered(created.connection.quick_create_url, templateURL=other_url)

    role_arn = local_aws.create_customer_stack(link)

    (statement,) = trust_policy(local_aws, role_arn)["Statement"]
    assert statement["Principal"] == {"AWS": elsewhere}
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await running.stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# Tenant ids are 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or a digit.
AWKWARD_TENANTS = ["a", "7", "acme", "1st-tenant", "a.b_c", "A_._-z", "x" * 64, "9" * 64, "a-" * 32]
# Stack names as CloudFormation takes them; the role it makes is `<stack>-<logical id>-<12 or 13
# random characters>`, and IAM role names are at most 64 characters.
STACK_NAME = re.compile(r"[A-Za-z][-A-Za-z0-9]*")
ROLE_NAME_AROUND = len("-BrokerReadOnlyRole-") + 13


@pytest.mark.parametrize("tenant_id", AWKWARD_TENANTS)
def test_stack_names_are_valid_for_any_tenant_and_leave_room_for_the_role_name(
    tenant_id: str,
) -> None:
    for _ in range(50):
        name = stack_name(tenant_id, new_external_id())
        assert STACK_NAME.fullmatch(name), name
        assert len(name) + ROLE_NAME_AROUND <= 64, name
        assert name.startswith("credential-broker-"), "the platform role's policy matches it"
        assert "--" not in name, name


def test_each_connection_has_its_own_stack_name() -> None:
    external_ids = [new_external_id() for _ in range(200)]
    names = {stack_name("acme", external_id) for external_id in external_ids}
    assert len(names) == len(external_ids), "a new external ID, a new stack name"
    assert stack_name("acme", external_ids[0]) == stack_name("acme", external_ids[0])
    assert stack_name("acme", external_ids[0]).startswith("credential-broker-acme-")


def link_stack_name(url: str) -> str:
    return parse_qs(urlsplit(url).fragment.partition("?")[2])["stackName"][0]


async def test_reconnecting_without_deleting_the_old_stack_creates_a_new_one(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    """The customer disconnects, keeps the old stack, and connects again from the new link:
    the console must not refuse the stack name (AlreadyExistsException)."""
    stub = running.stub
    first = (await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))).connection
    assert first.stack_name == link_stack_name(first.quick_create_url)
    assert first.stack_name in first.guidance
    old_role = local_aws.create_customer_stack(first.quick_create_url)
    await stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=old_role))
    gone = (await stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))).connection
    assert gone.stack_name == first.stack_name
    assert f"delete the CloudFormation stack {first.stack_name}" in gone.guidance

    second = (await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))).connection
    assert second.external_id != first.external_id
    assert second.stack_name == link_stack_name(second.quick_create_url) != first.stack_name
    new_role = local_aws.create_customer_stack(second.quick_create_url)
    cloudformation = local_aws.client("cloudformation", CUSTOMER_ACCOUNT)
    for name in (first.stack_name, second.stack_name):  # by name: the account holds many
        (stack,) = cloudformation.describe_stacks(StackName=name)["Stacks"]
        assert stack["StackStatus"] == "CREATE_COMPLETE"
    verified = await stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=new_role))
    assert verified.connection.status == pb.CONNECTION_STATUS_ACTIVE
    assert verified.connection.stack_name == second.stack_name


@pytest.mark.parametrize("shape", ["9{}", "{}.x_y", "{}" + "_" * 40, "{}" + "z" * 64])
async def test_awkward_tenant_ids_give_stacks_whose_roles_verify(
    running: Running, local_aws: LocalAws, tenant: str, shape: str
) -> None:
    tenant_id = shape.format(tenant)[:64]
    created = await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant_id))
    role_arn = local_aws.create_customer_stack(created.connection.quick_create_url)
    role_name = role_arn.rpartition("/")[2]
    assert role_name.startswith(created.connection.stack_name + "-")
    assert len(role_name) <= 64
    verified = await running.stub.VerifyRole(
        pb.VerifyRoleRequest(tenant_id=tenant_id, role_arn=role_arn)
    )
    assert verified.connection.status == pb.CONNECTION_STATUS_ACTIVE
