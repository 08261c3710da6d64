"""A bearer token (and the credentials answered) never cross the network in plaintext: without
TLS, `BrokerClient` and `broker sandbox-endpoint` reach only loopback or a unix socket, for every
form a gRPC target can take. Refusals happen before any channel exists; allowed forms reach a
real broker. And the client's failures are typed: a launcher tells a released run from a tenant
that is not (or no longer) connected, unknown, or a broker that cannot be reached."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.client import (
    BrokerClient,
    BrokerUnavailable,
    ClientTls,
    InvalidRequest,
    PlaintextRefused,
    TenantDisconnected,
    TenantNotActive,
    TenantNotFound,
    TenantSuspended,
)
from broker.emulator import CUSTOMER_ACCOUNT, Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from tests.certs import Authority
from tests.conftest import connect, settings_for, start_broker
from tests.processes import BIN

TOKEN = "tok-" + "s3cr3t" * 6  # recognisable, so a test can look for it in any output

REFUSED = [
    "broker.internal:50051",
    "10.1.2.3:50051",
    "0.0.0.0:50051",
    "[::]:50051",
    "[2001:db8::1]:50051",
    "localhost.example.com:50051",
    "127.0.0.1.example.com:50051",
    "localhost-1:50051",
    "broker.internal",
    "dns:///broker.internal:50051",
    "dns:broker.internal:50051",
    "dns://127.0.0.1/broker.internal:50051",  # a loopback DNS server, a remote broker
    "dns:///localhost.example.com:50051",
    "ipv4:10.1.2.3:50051",
    "ipv4:127.0.0.1:50051,10.1.2.3:50051",  # one remote address is enough
    "ipv6:[2001:db8::1]:50051",
    "xds:///broker",
]
LOOPBACK = [
    "127.0.0.1:{port}",
    "localhost:{port}",
    "dns:///127.0.0.1:{port}",
    "dns:127.0.0.1:{port}",
    "dns:///localhost:{port}",
    "ipv4:127.0.0.1:{port}",
    "ipv4:127.0.0.1:{port},127.0.0.1:{port}",
]
LOCAL_ONLY = ["[::1]:50051", "ipv6:[::1]:50051", "127.8.9.10:50051", "localhost"]
SOCKETS = ["unix:/run/broker.sock", "unix:///run/broker.sock", "unix-abstract:broker"]


@pytest.fixture
def channels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every channel BrokerClient opens, by kind (the real channel is still made)."""
    opened: list[str] = []

    def recording(kind: str, make: Callable[..., Any]) -> Callable[..., Any]:
        def opener(*args: Any, **kwargs: Any) -> Any:
            opened.append(kind)
            return make(*args, **kwargs)

        return opener

    monkeypatch.setattr(grpc.aio, "insecure_channel", recording("plain", grpc.aio.insecure_channel))
    monkeypatch.setattr(grpc.aio, "secure_channel", recording("tls", grpc.aio.secure_channel))
    return opened


@pytest.mark.parametrize("token", [TOKEN, None], ids=["token", "no-token"])
@pytest.mark.parametrize("target", REFUSED)
def test_client_refuses_a_remote_broker_without_tls_before_any_channel(
    target: str, token: str | None, channels: list[str]
) -> None:
    with pytest.raises(PlaintextRefused, match="without TLS") as refused:
        BrokerClient(target, token=token)
    assert isinstance(refused.value, ValueError)
    assert target in str(refused.value)
    assert TOKEN not in str(refused.value)
    assert channels == []


@pytest.mark.parametrize("target", LOCAL_ONLY + SOCKETS)
async def test_client_accepts_loopback_and_unix_sockets_without_tls(
    target: str, channels: list[str]
) -> None:
    client = BrokerClient(target, token=TOKEN)
    await client.close()
    assert channels == ["plain"]


@pytest.mark.parametrize("target", [*REFUSED[:6], "dns:///broker.internal:50051"])
async def test_client_reaches_a_remote_broker_over_tls(
    target: str, channels: list[str], tmp_path: Path
) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(Authority("broker-ca").cert_pem)
    client = BrokerClient(target, tls=ClientTls(ca), token=TOKEN)
    await client.close()
    assert channels == ["tls"]


async def test_every_loopback_form_reaches_a_real_broker_with_its_token(
    local_aws: LocalAws, broker_identity: Identity, template_url: str, tmp_path: Path
) -> None:
    settings = settings_for(f"sqlite:///{tmp_path / 'b.db'}", local_aws, template_url)
    async with start_broker(settings, broker_identity) as running:
        for number, form in enumerate(LOOPBACK):
            async with BrokerClient(form.format(port=running.broker.port), token=TOKEN) as client:
                created = await client.create_connection(f"client-{number}")
                assert created.external_id, form


def sandbox_endpoint(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    command = [str(BIN / "broker"), "sandbox-endpoint", "--tenant", "acme", "--run", "run-1"]
    return subprocess.run(
        [*command, *args, "--token-file", str(token_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
        check=False,
    )


@pytest.mark.parametrize(
    "target",
    [
        "broker.internal:50051",
        "0.0.0.0:50051",
        "[2001:db8::1]:50051",
        "localhost.example.com:50051",
        "127.0.0.1.example.com:50051",
        "dns:///broker.internal:50051",
        "ipv4:10.1.2.3:50051",
        "ipv6:[2001:db8::1]:50051",
    ],
)
def test_sandbox_endpoint_refuses_a_remote_broker_without_tls(target: str, tmp_path: Path) -> None:
    done = sandbox_endpoint("--broker", target, tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"broker: refusing to reach the broker at {target} without TLS")
    assert "--ca-file" in line
    assert TOKEN not in done.stdout + done.stderr


def test_sandbox_endpoint_refuses_a_client_certificate_without_the_brokers_ca(
    tmp_path: Path,
) -> None:
    certificate = tmp_path / "me.crt"
    certificate.write_text("not read")
    done = sandbox_endpoint(
        "--broker", "127.0.0.1:50051", "--cert-file", str(certificate), tmp_path=tmp_path
    )
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "need --ca-file" in line
    assert TOKEN not in done.stdout + done.stderr


def test_sandbox_endpoint_says_when_the_token_file_cannot_be_read(tmp_path: Path) -> None:
    command = [str(BIN / "broker"), "sandbox-endpoint", "--tenant", "acme", "--run", "run-1"]
    done = subprocess.run(
        [*command, "--broker", "127.0.0.1:50051", "--token-file", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("broker: --token-file: cannot read it")


async def test_the_watch_tells_a_release_from_every_refusal(
    local_aws: LocalAws, broker_identity: Identity, template_url: str, tmp_path: Path
) -> None:
    settings = settings_for(f"sqlite:///{tmp_path / 'b.db'}", local_aws, template_url)
    async with start_broker(settings, broker_identity) as running:
        await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id="pending"))
        await connect(running, local_aws, "acme")
        async with BrokerClient(running.address, connect_timeout=5) as client:
            refusals = {
                ("pending", "r"): TenantNotActive,
                ("nobody", "r"): TenantNotFound,
                ("not a tenant", "r"): InvalidRequest,
            }
            for (tenant, run), kind in refusals.items():
                with pytest.raises(kind) as refused:
                    await anext(client.watch_credentials(tenant, run))
                assert type(refused.value) is kind
                assert "\n" not in str(refused.value)
            with pytest.raises(TenantNotActive, match="is PENDING, not ACTIVE"):
                await client.issue_credentials("pending", "r")

            released = client.watch_credentials("acme", "released")
            await anext(released)
            await client.release_credentials("acme", "released")
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(anext(released), timeout=10)

            cut_off = client.watch_credentials("acme", "cut-off")
            await anext(cut_off)
            await client.disconnect("acme")
            with pytest.raises(TenantDisconnected, match="tenant 'acme' was disconnected"):
                await asyncio.wait_for(anext(cut_off), timeout=10)
            with pytest.raises(TenantNotActive, match="is DISCONNECTED, not ACTIVE") as after:
                await anext(client.watch_credentials("acme", "later"))
            assert type(after.value) is TenantNotActive


async def test_an_unreachable_broker_is_given_up_on_after_the_connect_budget() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with BrokerClient(f"127.0.0.1:{port}", connect_timeout=1) as client:
        for call in (
            lambda: anext(client.watch_credentials("acme", "r")),
            lambda: client.issue_credentials("acme", "r"),
        ):
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="Connection refused"):
                await call()
            assert 1 <= time.monotonic() - started < 3


async def test_a_watch_holding_valid_credentials_waits_for_the_broker_until_they_expire(
    local_aws: LocalAws, broker_identity: Identity, template_url: str, tmp_path: Path, tenant: str
) -> None:
    """The budget counts only while the sandbox has nothing valid: a broker gone for longer than
    it is waited for while the credentials last, and given up on once they have expired."""
    settings = settings_for(f"sqlite:///{tmp_path / 'b.db'}", local_aws, template_url)
    async with start_broker(settings, broker_identity) as running:
        await connect(running, local_aws, tenant)
        local_aws.sts.session_lifetime = 4
        client = BrokerClient(running.address, connect_timeout=1, reconnect_backoff=(0.05, 0.2))
        watch = client.watch_credentials(tenant, "r")
        held = await anext(watch)
        await running.broker.stop(grace=0)
        stopped = time.monotonic()
    assert (held.expiration - datetime.now(UTC)).total_seconds() > 1.5, "outlives the budget"
    renewals = [held]  # renewals sent before the stop may still arrive; then nothing more

    async def follow() -> None:
        async for renewed in watch:
            renewals.append(renewed)

    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(follow(), timeout=15)
    gave_up = datetime.now(UTC)
    waited = time.monotonic() - stopped
    await client.close()
    assert waited > 1.5, "not given up after the 1 s budget while credentials were valid"
    assert renewals[-1].expiration <= gave_up, "given up only once they expired"
    assert (gave_up - renewals[-1].expiration).total_seconds() < 2.5, "and soon after"


async def test_a_plaintext_client_never_goes_through_an_http_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gRPC honours http(s)_proxy / grpc_proxy even for a loopback target: the token and the
    credentials would cross the proxy in plaintext. A client without TLS ignores them."""
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(1)
    proxy.settimeout(0.2)
    url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
    for name in ("https_proxy", "http_proxy", "grpc_proxy"):
        monkeypatch.setenv(name, url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    async with BrokerClient("127.0.0.2:9", token="SECRET-TOKEN", connect_timeout=1) as client:
        with pytest.raises(BrokerUnavailable):  # nothing listens there
            await client.get_connection("acme")
    with pytest.raises(TimeoutError):
        proxy.accept()
    proxy.close()


async def test_a_call_the_server_cancelled_is_made_again() -> None:
    """A replica that stops accepting can cancel a call that reached it in that instant (gRPC
    core answers CANCELLED): IssueCredentials, idempotent, is made again and answered."""
    answered: list[str] = []

    async def issue(request: pb.IssueCredentialsRequest, context: Any) -> Any:
        answered.append(request.run_id)
        if len(answered) == 1:
            await context.abort(grpc.StatusCode.CANCELLED, "the server is stopping")
        expiration = datetime.now(UTC).replace(microsecond=0)
        response = pb.IssueCredentialsResponse(
            credentials=pb.Credentials(access_key_id="ASIA0", region="eu-west-2")
        )
        response.credentials.expiration.FromDatetime(expiration)
        return response

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        issue,
        request_deserializer=pb.IssueCredentialsRequest.FromString,
        response_serializer=pb.IssueCredentialsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "broker.v1.CredentialBroker", {"IssueCredentials": handler}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with BrokerClient(f"127.0.0.1:{port}", connect_timeout=5) as client:
            credentials = await client.issue_credentials("acme", "run-1")
    finally:
        await server.stop(0)
    assert credentials.access_key_id == "ASIA0"
    assert answered == ["run-1", "run-1"]


async def test_the_watch_reads_the_brokers_reasons(
    local_aws: LocalAws, broker_identity: Identity, template_url: str, tmp_path: Path
) -> None:
    """The broker says why a stream ended (google.rpc.ErrorInfo): a run whose id is its
    tenant's id ends normally when released (before, indistinguishable from a disconnect), and
    a suspension is told from a disconnect."""
    settings = settings_for(f"sqlite:///{tmp_path / 'b.db'}", local_aws, template_url)
    async with start_broker(settings | {"reverify_interval": 0.5}, broker_identity) as running:
        connection = await connect(running, local_aws, "acme")
        async with BrokerClient(running.address, connect_timeout=5) as client:
            same_name = client.watch_credentials("acme", "acme")
            await anext(same_name)
            await client.release_credentials("acme", "acme")
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(anext(same_name), timeout=10)

            suspended = client.watch_credentials("acme", "r")
            await anext(suspended)
            loose = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": connection.trusted_principal_arn},
                        "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
                    }
                ],
            }
            local_aws.client("iam", CUSTOMER_ACCOUNT).update_assume_role_policy(
                RoleName=connection.role_arn.rsplit("/", 1)[1], PolicyDocument=json.dumps(loose)
            )
            with pytest.raises(TenantSuspended, match="suspended"):
                await asyncio.wait_for(anext(suspended), timeout=10)
