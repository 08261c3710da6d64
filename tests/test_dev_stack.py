"""`broker dev-stack LINK` does what the customer's console does with a quick-create link, in the
local emulator the link's templateURL names (where `broker dev` published the template), and
says in one line why when it cannot."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess

import pytest

from broker.connections import new_external_id
from broker.emulator import LocalAws
from broker.template import quick_create_url
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running
from tests.processes import BIN


def dev_stack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "broker"), "dev-stack", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
        check=False,
    )


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def link(template_url: str) -> str:
    return quick_create_url(
        template_url=template_url,
        region="us-east-1",
        tenant_id="acme",
        external_id=new_external_id(),
    )


def one_line_refusal(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    return line


async def test_the_stack_is_made_in_the_emulator_the_link_names(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    """The emulator here is on a random port, not 5000: the link says where it is."""
    created = await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    url = created.connection.quick_create_url
    assert not created.connection.template_url.startswith("http://127.0.0.1:5000/")

    done = await asyncio.to_thread(dev_stack, url)

    assert done.returncode == 0, done.stderr
    role_arn = done.stdout.strip()
    assert created.connection.stack_name in role_arn
    verified = await running.stub.VerifyRole(
        pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn)
    )
    assert verified.connection.status == pb.CONNECTION_STATUS_ACTIVE

    again = await asyncio.to_thread(dev_stack, url)
    line = one_line_refusal(again)
    assert f"the emulator at {local_aws.endpoint_url} made no stack" in line
    assert "already exists" in line


def test_nothing_listening_where_the_link_points_is_one_line() -> None:
    port = closed_port()
    line = one_line_refusal(dev_stack(link(f"http://127.0.0.1:{port}/bucket/customer-role.yaml")))
    assert f"nothing answers at http://127.0.0.1:{port}" in line
    assert "broker dev" in line


def test_aws_endpoint_overrides_the_link(local_aws: LocalAws) -> None:
    port = closed_port()
    url = link(f"{local_aws.endpoint_url}/bucket/customer-role.yaml")
    line = one_line_refusal(dev_stack(url, "--aws-endpoint", f"http://127.0.0.1:{port}"))
    assert f"nothing answers at http://127.0.0.1:{port}" in line


def test_a_template_outside_a_local_emulator_needs_aws_endpoint() -> None:
    url = link("https://credential-broker-templates.s3.amazonaws.com/v1/customer-role.yaml")
    line = one_line_refusal(dev_stack(url))
    assert "not in a local emulator" in line
    assert "--aws-endpoint" in line


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/",
        "not a link at all",
        "https://console.aws.amazon.com/cloudformation/home?region=us-east-1#/stacks/quickcreate"
        "?stackName=x",
        "https://console.aws.amazon.com/cloudformation/home#/stacks/create?templateURL=http://"
        "127.0.0.1:5000/b/k&stackName=x",
    ],
)
def test_anything_but_a_quick_create_link_is_one_line(url: str) -> None:
    line = one_line_refusal(dev_stack(url))
    assert "not a quick-create link" in line


def test_aws_endpoint_names_the_emulator_the_link_cannot(
    local_aws: LocalAws, template_url: str
) -> None:
    """A link whose template is published under an address that is not loopback (an emulator
    in a container, say) works when --aws-endpoint says where that emulator is."""
    elsewhere = template_url.replace(local_aws.endpoint_url, "http://emulator.invalid:5000")
    done = dev_stack(link(elsewhere), "--aws-endpoint", local_aws.endpoint_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("arn:aws:iam::")
