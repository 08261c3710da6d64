"""Only the right callers, only the right RPCs: mTLS with real certificates made here, bearer
tokens of which only hashes are configured, and the per-RPC, per-tenant policy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker import auth
from broker.auth import hash_token, new_token
from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc
from tests.certs import Authority, Issued
from tests.conftest import start_broker

UI = "spiffe://example.org/ns/platform/sa/settings-ui"
LAUNCHER = "spiffe://example.org/ns/platform/sa/launcher"
POLICY = f"{UI}=connections; {LAUNCHER}=credentials"


@dataclass
class Pki:
    ca: Authority
    server: Issued
    ui: Issued
    launcher: Issued
    dns_only: Issued
    rogue_launcher: Issued
    files: dict[str, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority("broker test CA")
    rogue = Authority("someone else's CA")
    server = ca.issue("broker", dns=("localhost",), ips=("127.0.0.1",), server=True)
    files = {
        "ca": folder / "ca.pem",
        "cert": folder / "server.pem",
        "key": folder / "server-key.pem",
    }
    files["ca"].write_bytes(ca.cert_pem)
    files["cert"].write_bytes(server.cert_pem)
    files["key"].write_bytes(server.key_pem)
    return Pki(
        ca,
        server,
        ca.issue("settings-ui", uris=(UI,)),
        ca.issue("launcher", uris=(LAUNCHER,), dns=("launcher.internal",)),
        ca.issue("ops", dns=("ops.internal",)),
        rogue.issue("launcher", uris=(LAUNCHER,)),
        files,
    )


def tls_settings(pki: Pki, base: dict[str, Any], **more: Any) -> dict[str, Any]:
    return base | {
        "tls_cert_file": str(pki.files["cert"]),
        "tls_key_file": str(pki.files["key"]),
        **more,
    }


def channel_as(address: str, pki: Pki, client: Issued | None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        pki.ca.cert_pem,
        client.key_pem if client else None,
        client.cert_pem if client else None,
    )
    return grpc.aio.secure_channel(address, credentials)


@pytest.fixture
async def mtls_broker(
    pki: Pki, broker_settings: dict[str, Any], broker_identity: Identity
) -> AsyncIterator[str]:
    settings = tls_settings(
        pki,
        broker_settings,
        tls_client_ca_file=str(pki.files["ca"]),
        policy=POLICY + "; dns:ops.internal=GetConnection",
    )
    async with start_broker(settings, broker_identity) as running:
        yield running.address


async def refused_code(channel: grpc.aio.Channel, call: str, request: Any) -> grpc.StatusCode:
    stub = broker_pb2_grpc.CredentialBrokerStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await getattr(stub, call)(request, timeout=5)
    code: grpc.StatusCode = refused.value.code()
    return code


async def test_mtls_identities_get_only_their_rpcs(
    mtls_broker: str, pki: Pki, local_aws: LocalAws, tenant: str
) -> None:
    async with (
        channel_as(mtls_broker, pki, pki.ui) as ui_channel,
        channel_as(mtls_broker, pki, pki.launcher) as launcher_channel,
        channel_as(mtls_broker, pki, pki.dns_only) as ops_channel,
    ):
        ui = broker_pb2_grpc.CredentialBrokerStub(ui_channel)
        launcher = broker_pb2_grpc.CredentialBrokerStub(launcher_channel)
        created = await ui.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
        role_arn = local_aws.create_customer_stack(created.connection.quick_create_url)
        await ui.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))

        issued = await launcher.IssueCredentials(
            pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r")
        )
        assert issued.credentials.access_key_id

        issue = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r")
        assert await refused_code(ui_channel, "IssueCredentials", issue) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        disconnect = pb.DisconnectRequest(tenant_id=tenant)
        assert await refused_code(launcher_channel, "Disconnect", disconnect) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        # A certificate without a SPIFFE ID is dns:NAME where the policy names its DNS SAN so.
        ops = broker_pb2_grpc.CredentialBrokerStub(ops_channel)
        got = await ops.GetConnection(pb.GetConnectionRequest(tenant_id=tenant))
        assert got.connection.status == pb.CONNECTION_STATUS_ACTIVE
        assert await refused_code(ops_channel, "Disconnect", disconnect) == (
            grpc.StatusCode.PERMISSION_DENIED
        )


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
async def test_callers_without_a_trusted_certificate_are_rejected(
    mtls_broker: str, pki: Pki, who: str
) -> None:
    client = None if who == "no certificate" else pki.rogue_launcher
    async with channel_as(mtls_broker, pki, client) as channel:
        request = pb.IssueCredentialsRequest(tenant_id="acme", run_id="r")
        assert await refused_code(channel, "IssueCredentials", request) == (
            grpc.StatusCode.UNAVAILABLE
        ), "the TLS handshake fails: no call reaches the broker"
    async with channel_as(mtls_broker, pki, pki.launcher) as good:
        health = health_pb2_grpc.HealthStub(good)
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_tokens_authenticate_by_hash_and_never_reach_the_log(
    pki: Pki,
    broker_settings: dict[str, Any],
    broker_identity: Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    launcher_token, ui_token = new_token(), new_token()
    settings = tls_settings(
        pki,
        broker_settings,
        token_hashes=f"launcher={hash_token(launcher_token)},ui={hash_token(ui_token)}",
        policy="token:ui=connections; token:launcher=credentials@acme|globex",
    )
    caplog.set_level(logging.INFO)
    async with (
        start_broker(settings, broker_identity) as running,
        channel_as(running.address, pki, None) as channel,
    ):
        stub = broker_pb2_grpc.CredentialBrokerStub(channel)

        def bearer(token: str) -> tuple[tuple[str, str]]:
            return (("authorization", f"Bearer {token}"),)

        get = pb.GetConnectionRequest(tenant_id="acme")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetConnection(get)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await stub.GetConnection(get, metadata=bearer(launcher_token[:-2] + "xx"))
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as known:
            await stub.GetConnection(get, metadata=bearer(ui_token))
        assert known.value.code() == grpc.StatusCode.NOT_FOUND, "authenticated and allowed"
        with pytest.raises(grpc.aio.AioRpcError) as not_theirs:
            await stub.GetConnection(get, metadata=bearer(launcher_token))
        assert not_theirs.value.code() == grpc.StatusCode.PERMISSION_DENIED
        other_tenant = pb.IssueCredentialsRequest(tenant_id="initech", run_id="r")
        with pytest.raises(grpc.aio.AioRpcError) as narrowed:
            await stub.IssueCredentials(other_tenant, metadata=bearer(launcher_token))
        assert narrowed.value.code() == grpc.StatusCode.PERMISSION_DENIED
        allowed_tenant = pb.IssueCredentialsRequest(tenant_id="acme", run_id="r")
        with pytest.raises(grpc.aio.AioRpcError) as passed_policy:
            await stub.IssueCredentials(allowed_tenant, metadata=bearer(launcher_token))
        assert passed_policy.value.code() == grpc.StatusCode.NOT_FOUND

    lines = [r for r in caplog.records if r.name == "broker.service"]
    assert [getattr(r, "caller", None) for r in lines[-4:]] == [
        "token:ui",
        "token:launcher",
        "token:launcher",
        "token:launcher",
    ]
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert launcher_token not in logged
    assert ui_token not in logged
    assert launcher_token[:-2] not in logged


async def test_calls_at_once_are_each_judged_by_their_own_metadata(
    pki: Pki,
    broker_settings: dict[str, Any],
    broker_identity: Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A call's caller and request id come from its own metadata whatever else is in flight:
    300 calls at once over one connection, in turn with the UI's token, the launcher's, and
    none; every other one sends a request id. None is judged or logged by another's."""
    ui_token, launcher_token = new_token(), new_token()
    settings = tls_settings(
        pki,
        broker_settings,
        token_hashes=f"launcher={hash_token(launcher_token)},ui={hash_token(ui_token)}",
        policy="token:ui=connections; token:launcher=credentials",
    )
    kinds = (  # token, the answer to GetConnection of an unknown tenant, the caller logged
        (ui_token, grpc.StatusCode.NOT_FOUND, "token:ui"),
        (launcher_token, grpc.StatusCode.PERMISSION_DENIED, "token:launcher"),
        (None, grpc.StatusCode.UNAUTHENTICATED, None),
    )
    caplog.set_level(logging.INFO)
    async with (
        start_broker(settings, broker_identity) as running,
        channel_as(running.address, pki, None) as channel,
    ):
        stub = broker_pb2_grpc.CredentialBrokerStub(channel)

        async def call(number: int) -> grpc.StatusCode:
            token = kinds[number % 3][0]
            metadata = [("authorization", f"Bearer {token}")] if token else []
            if number % 2 == 0:
                metadata.append(("x-request-id", f"call-{number}"))
            request = pb.GetConnectionRequest(tenant_id="acme")
            with pytest.raises(grpc.aio.AioRpcError) as answer:
                await stub.GetConnection(request, metadata=metadata, timeout=30)
            return answer.value.code()

        codes = await asyncio.gather(*(call(number) for number in range(300)))

    wrong = [(n, code) for n, code in enumerate(codes) if code != kinds[n % 3][1]]
    assert not wrong, f"{len(wrong)} calls judged as another caller, e.g. {wrong[:3]}"
    lines = [r for r in caplog.records if getattr(r, "method", None) == "GetConnection"]
    ids = [getattr(r, "request_id", None) for r in lines]
    assert len(ids) == 300
    assert len(set(ids)) == 300, "a call logged with another's request id"
    by_id = {getattr(r, "request_id", None): r for r in lines}
    for number in range(0, 300, 2):
        logged = by_id[f"call-{number}"]
        assert getattr(logged, "code", None) == kinds[number % 3][1].name
        assert getattr(logged, "caller", None) == kinds[number % 3][2]


@dataclass(frozen=True)
class Presented:
    """One row: a client certificate from the trusted CA (its SANs), maybe the launcher's
    token, the call, and what the broker must answer: OK or a status code, the caller the log
    line then names, or a phrase of the refusal."""

    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    token: bool = False
    rpc: str = "IssueCredentials"
    code: grpc.StatusCode = grpc.StatusCode.OK
    caller: str = ""
    refusal: str = ""


NUL_CUT = "\x00.attacker.example"
PRESENTED = {
    "the launcher's SPIFFE ID": Presented(uris=(LAUNCHER,), caller=LAUNCHER),
    "the launcher's token, with a certificate naming no caller": Presented(
        token=True, caller="token:launcher"
    ),
    "a DNS SAN spelling the launcher's SPIFFE ID": Presented(
        dns=(LAUNCHER,), code=grpc.StatusCode.UNAUTHENTICATED, refusal="names no caller"
    ),
    "a DNS SAN spelling the token's name": Presented(
        dns=("launcher",), code=grpc.StatusCode.UNAUTHENTICATED, refusal="names no caller"
    ),
    "a DNS SAN spelling token:launcher": Presented(
        dns=("token:launcher",), code=grpc.StatusCode.UNAUTHENTICATED, refusal="names no caller"
    ),
    "two URI SANs, one the launcher's": Presented(
        uris=(LAUNCHER, UI), code=grpc.StatusCode.UNAUTHENTICATED, refusal="2 URI SANs"
    ),
    "two URI SANs, with the launcher's token": Presented(
        uris=(LAUNCHER, "https://example.org/launcher"),
        token=True,
        code=grpc.StatusCode.UNAUTHENTICATED,
        refusal="2 URI SANs",
    ),
    "the launcher's SPIFFE ID followed by a NUL byte": Presented(
        uris=(LAUNCHER + NUL_CUT,), code=grpc.StatusCode.UNAUTHENTICATED, refusal="NUL"
    ),
    "a SPIFFE ID with an upper-case trust domain": Presented(
        uris=("spiffe://Example.org/ns/platform/sa/launcher",),
        code=grpc.StatusCode.UNAUTHENTICATED,
        refusal="not a SPIFFE ID",
    ),
    "dns:ops.internal": Presented(
        dns=("ops.internal",), rpc="GetConnection", caller="dns:ops.internal"
    ),
    "dns:ops.internal, on an RPC it may not call": Presented(
        dns=("ops.internal",), code=grpc.StatusCode.PERMISSION_DENIED, caller="dns:ops.internal"
    ),
    "a DNS SAN in upper case": Presented(
        dns=("OPS.Internal",), rpc="GetConnection", caller="dns:ops.internal"
    ),
    "a DNS SAN after one the policy does not name": Presented(
        dns=("unnamed.internal", "ops.internal"), rpc="GetConnection", caller="dns:ops.internal"
    ),
    "a non-SPIFFE URI SAN and a DNS SAN the policy names": Presented(
        uris=("https://example.org/ops",),
        dns=("ops.internal",),
        rpc="GetConnection",
        caller="dns:ops.internal",
    ),
    "a SPIFFE ID no rule names, and a DNS SAN the policy names": Presented(
        uris=("spiffe://example.org/ns/platform/sa/other",),
        dns=("ops.internal",),
        rpc="GetConnection",
        code=grpc.StatusCode.PERMISSION_DENIED,
        caller="spiffe://example.org/ns/platform/sa/other",
    ),
    "a DNS SAN the policy names, followed by a NUL byte": Presented(
        dns=("ops.internal" + NUL_CUT,),
        rpc="GetConnection",
        code=grpc.StatusCode.UNAUTHENTICATED,
        refusal="NUL",
    ),
    "DNS SANs naming two callers": Presented(
        dns=("ops.internal", "backup.internal"),
        rpc="GetConnection",
        code=grpc.StatusCode.UNAUTHENTICATED,
        refusal="name 2 callers",
    ),
    "the UI's SPIFFE ID, with the launcher's token": Presented(
        uris=(UI,), token=True, code=grpc.StatusCode.PERMISSION_DENIED, caller=UI
    ),
}


async def test_a_certificate_is_only_the_caller_it_names(
    pki: Pki,
    broker_settings: dict[str, Any],
    broker_identity: Identity,
    local_aws: LocalAws,
    tenant: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Identities of each kind live in their own namespace: a certificate from the trusted CA
    whose DNS SAN spells a SPIFFE ID or a token's name gets no one's rights; a certificate
    that does not name exactly one caller is refused."""
    token = new_token()
    settings = tls_settings(
        pki,
        broker_settings,
        tls_client_ca_file=str(pki.files["ca"]),
        token_hashes=f"launcher={hash_token(token)}",
        policy=f"{UI}=connections; {LAUNCHER}=credentials; token:launcher=credentials; "
        "dns:ops.internal=GetConnection; dns:backup.internal=GetConnection",
    )
    caplog.set_level(logging.INFO)
    answers: dict[str, tuple[grpc.StatusCode, str]] = {}
    async with start_broker(settings, broker_identity) as running:
        async with channel_as(running.address, pki, pki.ui) as ui_channel:
            ui = broker_pb2_grpc.CredentialBrokerStub(ui_channel)
            created = await ui.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
            role_arn = local_aws.create_customer_stack(created.connection.quick_create_url)
            await ui.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))
        requests = {
            "IssueCredentials": pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r"),
            "GetConnection": pb.GetConnectionRequest(tenant_id=tenant),
        }
        for number, (name, row) in enumerate(PRESENTED.items()):
            certificate = pki.ca.issue(f"row {number}", uris=row.uris, dns=row.dns)
            metadata = [("x-request-id", f"row-{number}")]
            if row.token:
                metadata.append(("authorization", f"Bearer {token}"))
            async with channel_as(running.address, pki, certificate) as channel:
                stub = broker_pb2_grpc.CredentialBrokerStub(channel)
                try:
                    await getattr(stub, row.rpc)(requests[row.rpc], metadata=metadata, timeout=5)
                    answers[name] = (grpc.StatusCode.OK, "")
                except grpc.aio.AioRpcError as refused:
                    answers[name] = (refused.code(), refused.details() or "")

    logged = {
        getattr(r, "request_id", None): getattr(r, "caller", None)
        for r in caplog.records
        if r.name == "broker.service"
    }
    wrong = []
    for number, (name, row) in enumerate(PRESENTED.items()):
        code, details = answers[name]
        if code != row.code or row.refusal not in details:
            wrong.append(f"{name}: {code.name} {details!r}, expected {row.code.name}")
        if row.caller and logged.get(f"row-{number}") != row.caller:
            wrong.append(f"{name}: logged as {logged.get(f'row-{number}')!r}, not {row.caller}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("uris", "dns", "expected"),
    [
        ((LAUNCHER,), (), ((LAUNCHER.encode(),), ())),
        ((), ("b.internal", "a.internal"), ((), (b"a.internal", b"b.internal"))),
        ((LAUNCHER + NUL_CUT,), (), (((LAUNCHER + NUL_CUT).encode(),), ())),
        ((), (), ((), ())),
    ],
)
def test_certificate_names_are_read_from_the_certificate_itself(
    pki: Pki, uris: tuple[str, ...], dns: tuple[str, ...], expected: object
) -> None:
    """The reader that checks grpc's view of a client certificate sees whole SANs (grpc's stop
    at a NUL byte), and an IP SAN is neither."""
    issued = pki.ca.issue("reader", uris=uris, dns=dns, ips=("10.0.0.1",))
    assert auth._certificate_names(issued.cert_pem) == expected


@pytest.mark.parametrize(
    "damage",
    [
        lambda pem: pem[:120] + pem[180:],
        lambda pem: pem.replace(b"CERTIFICATE", b"KEY"),
        lambda pem: b"",
    ],
    ids=["cut", "not a certificate", "empty"],
)
def test_an_unreadable_certificate_has_no_names(pki: Pki, damage: Any) -> None:
    assert auth._certificate_names(damage(pki.launcher.cert_pem)) is None


def test_authentication_without_a_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a policy"):
        auth.Guard(mtls=True, token_hashes={}, policy=None)
