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
from broker.template import template_body
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
