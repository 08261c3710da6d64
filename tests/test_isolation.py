"""Only this tenant, only this role, only while connected: the confused-deputy attacks and the
races a caller must never win, each through gRPC against an STS that enforces trust policies."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.connections import ROLE_NOT_SHARED, Connections
from broker.connections import Settings as ConnectionSettings
from broker.emulator import CUSTOMER_ACCOUNT, Identity, LocalAws
from broker.errors import RoleNotAssumable, VerificationFailed
from broker.models import Check, Connection, Credentials, Status
from broker.store import open_store
from broker.trust import allows
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running, StsLog, connect, settings_for, start_broker
from tests.test_verify import make_role, pending, trusting, verify_fails

# Trust conditions that let the broker in with external IDs other than the tenant's own.
LOOSE_CONDITIONS = {
    "StringLike *": {"StringLike": {"sts:ExternalId": "*"}},
    "Null false": {"Null": {"sts:ExternalId": "false"}},
    "StringNotEquals": {"StringNotEquals": {"sts:ExternalId": "x"}},
}


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value.code()


@pytest.mark.parametrize("condition", LOOSE_CONDITIONS.values(), ids=LOOSE_CONDITIONS.keys())
async def test_a_role_that_takes_any_external_id_serves_no_tenant(
    running: Running, local_aws: LocalAws, tenant: str, condition: dict[str, Any]
) -> None:
    """The attack: a second tenant verifies the first customer's role with its own external ID.
    A role whose trust condition admits other IDs fails verification for every tenant."""
    victim = await pending(running, tenant)
    attacker = await pending(running, f"{tenant}-attacker")
    role = make_role(
        local_aws, f"loose-{tenant}", trusting(victim.trusted_principal_arn, condition)
    )
    for connection in (victim, attacker):
        result = await verify_fails(running, connection.tenant_id, role)
        assert result["checks"]["assume_with_other_external_id_denied"] is False
        assert result["checks"]["trust_policy_requires_external_id"] is False
        detail = result["violations"]["assume_with_other_external_id_denied"]
        assert "confused deputy" in detail
        assert connection.external_id in detail, "the detail says what the condition must be"
        assert (
            await code_of(
                running.stub.IssueCredentials(
                    pb.IssueCredentialsRequest(tenant_id=connection.tenant_id, run_id="r")
                )
            )
            == grpc.StatusCode.FAILED_PRECONDITION
        )


async def test_a_role_trusting_every_principal_is_refused_even_with_the_right_external_id(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    """`Principal: {"AWS": "*"}` with the tenant's external ID passes every probe (only we
    probe), but anyone in any account who learns the external ID could assume the role: the
    read-back of the trust policy refuses it, and says so."""
    connection = await pending(running, tenant)
    condition = {"StringEquals": {"sts:ExternalId": connection.external_id}}
    role = make_role(local_aws, f"everyone-{tenant}", trusting("*", condition))
    result = await verify_fails(running, tenant, role)
    assert result["checks"] == {
        "role_arn_format": True,
        "role_not_used_by_another_tenant": True,
        "assume_with_external_id": True,
        "assume_without_external_id_denied": True,
        "assume_with_other_external_id_denied": True,
        "trust_policy_requires_external_id": False,
    }
    detail = result["violations"]["trust_policy_requires_external_id"]
    assert "'*'" in detail
    assert "not a secret" in detail
    assert connection.trusted_principal_arn in detail


@pytest.mark.parametrize("spelling", ["same", "upper case", "with a path"])
async def test_one_role_serves_one_tenant(
    running: Running, local_aws: LocalAws, tenant: str, sts_log: StsLog, spelling: str
) -> None:
    """A role ACTIVE for one tenant cannot be verified for another, under any name IAM gives
    it; the refusal does not name the other tenant and costs no STS call. After the first
    tenant disconnects, the role is free again."""
    first = await connect(running, local_aws, tenant)
    account, name = first.role_arn.split(":")[4], first.role_arn.rsplit("/", 1)[1]
    role = {
        "same": first.role_arn,
        "upper case": f"arn:aws:iam::{account}:role/{name.upper()}",
        "with a path": f"arn:aws:iam::{account}:role/team/{name}",
    }[spelling]
    second = f"{tenant}-second"
    created = await pending(running, second)
    calls_before = len(sts_log.now())
    result = await verify_fails(running, second, role)
    assert result["checks"]["role_not_used_by_another_tenant"] is False
    detail = result["violations"]["role_not_used_by_another_tenant"]
    assert "separate stack" in detail
    assert tenant not in detail.replace(role, ""), "never names the other tenant"
    assert [c for c in sts_log.now()[calls_before:] if c.external_id == created.external_id] == []

    await running.stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
    after = await verify_fails(running, second, role)
    assert after["checks"]["role_not_used_by_another_tenant"] is True
    assert after["checks"]["assume_with_external_id"] is False, "it trusts the first's ID only"


async def test_the_periodic_recheck_suspends_a_role_whose_trust_was_trusting(
    local_aws: LocalAws,
    tenant: str,
    broker_settings: dict[str, Any],
    broker_identity: Identity,
) -> None:
    """The customer loosens the trust policy of a connected role: within a re-check interval
    the connection is SUSPENDED, nothing more is issued, its stream ends, GetConnection says
    why; once the policy is fixed, VerifyRole makes it ACTIVE again."""
    async with start_broker(
        broker_settings | {"reverify_interval": 0.5}, broker_identity
    ) as running:
        stub = running.stub
        connection = await connect(running, local_aws, tenant)
        issue = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r")
        await stub.IssueCredentials(issue)
        stream = stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="w"))
        await stream.read()

        iam = local_aws.client("iam", CUSTOMER_ACCOUNT)
        role_name = connection.role_arn.rsplit("/", 1)[1]
        proper = iam.get_role(RoleName=role_name)["Role"]["AssumeRolePolicyDocument"]
        loose = {
            "Version": "2012-10-17",
            "Statement": [
                trusting(connection.trusted_principal_arn, LOOSE_CONDITIONS["StringLike *"])
            ],
        }
        iam.update_assume_role_policy(RoleName=role_name, PolicyDocument=json.dumps(loose))
        loosened_at = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(stream.read(), timeout=10)
        assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "suspended" in (ended.value.details() or "")
        assert time.monotonic() - loosened_at < 5

        got = (await stub.GetConnection(pb.GetConnectionRequest(tenant_id=tenant))).connection
        assert got.status == pb.CONNECTION_STATUS_SUSPENDED
        failed = {c.name for c in got.checks if not c.passed}
        assert "assume_with_other_external_id_denied" in failed
        assert "suspended" in got.guidance
        assert await code_of(stub.IssueCredentials(issue)) == grpc.StatusCode.FAILED_PRECONDITION
        assert len(running.broker.cache) == 0
        events = await stub.ListConnectionEvents(pb.ListConnectionEventsRequest(tenant_id=tenant))
        assert events.events[0].kind == "verification_failed"
        assert events.events[0].actor == "broker:recheck"
        assert (
            await code_of(stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant)))
            == grpc.StatusCode.ALREADY_EXISTS
        )

        iam.update_assume_role_policy(RoleName=role_name, PolicyDocument=json.dumps(proper))
        verified = await stub.VerifyRole(
            pb.VerifyRoleRequest(tenant_id=tenant, role_arn=connection.role_arn)
        )
        assert verified.connection.status == pb.CONNECTION_STATUS_ACTIVE
        await stub.IssueCredentials(issue)


async def test_verifying_an_active_role_again_after_it_was_loosened_suspends_it(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    """VerifyRole on the connection's own role, now failing: never a connection that stays
    ACTIVE beside failed checks."""
    connection = await connect(running, local_aws, tenant)
    role_name = connection.role_arn.rsplit("/", 1)[1]
    loose = {
        "Version": "2012-10-17",
        "Statement": [trusting(connection.trusted_principal_arn, LOOSE_CONDITIONS["Null false"])],
    }
    local_aws.client("iam", CUSTOMER_ACCOUNT).update_assume_role_policy(
        RoleName=role_name, PolicyDocument=json.dumps(loose)
    )
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await running.stub.VerifyRole(
            pb.VerifyRoleRequest(tenant_id=tenant, role_arn=connection.role_arn)
        )
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    got = await running.stub.GetConnection(pb.GetConnectionRequest(tenant_id=tenant))
    assert got.connection.status == pb.CONNECTION_STATUS_SUSPENDED
    assert (
        await code_of(
            running.stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r"))
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )


async def test_a_disconnect_wins_over_credentials_being_minted(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    """STS answers in 1.5 s; a Disconnect acknowledged meanwhile: the IssueCredentials and the
    WatchCredentials whose AssumeRole was under way get FAILED_PRECONDITION, not fresh keys,
    and nothing is cached."""
    await connect(running, local_aws, tenant)
    await disconnect_while_minting(running, running, local_aws, tenant)
    assert len(running.broker.cache) == 0


async def disconnect_while_minting(
    minting: Running, disconnecting: Running, local_aws: LocalAws, tenant: str
) -> None:
    """STS slowed to 1.5 s: `minting` is asked for a new run's credentials and a new stream;
    `disconnecting` disconnects the tenant meanwhile. Both must be refused, soon after."""
    local_aws.sts.latency = 1.5
    issuing = asyncio.ensure_future(
        minting.stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="new"))
    )
    stream = minting.stub.WatchCredentials(
        pb.WatchCredentialsRequest(tenant_id=tenant, run_id="watched")
    )
    watching = asyncio.ensure_future(stream.read())
    await asyncio.sleep(0.3)
    await disconnecting.stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
    acknowledged = time.monotonic()
    assert await code_of(issuing) == grpc.StatusCode.FAILED_PRECONDITION
    assert await code_of(watching) == grpc.StatusCode.FAILED_PRECONDITION
    assert time.monotonic() - acknowledged < 3


async def test_a_disconnect_on_another_replica_wins_over_credentials_being_minted(
    postgres_url: str,
    local_aws: LocalAws,
    tenant: str,
    template_url: str,
    broker_identity: Identity,
) -> None:
    """The same across replicas: B's AssumeRoles (a call's, a new stream's) are under way when
    A's Disconnect commits; B reads the store again after STS answers and hands nothing out,
    and the stream ends."""
    settings = settings_for(postgres_url, local_aws, template_url)
    async with (
        start_broker(settings, broker_identity) as a,
        start_broker(settings, broker_identity) as b,
    ):
        await connect(a, local_aws, tenant)
        await b.stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="warm"))
        await disconnect_while_minting(b, a, local_aws, tenant)


async def test_concurrent_verifications_of_one_connection_one_wins_the_other_is_aborted(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    """Two VerifyRole calls with different roles at once: one OK, the other ABORTED (never a
    second OK silently overwritten); the stored role is the winner's."""
    connection = await pending(running, tenant)
    condition = {"StringEquals": {"sts:ExternalId": connection.external_id}}
    roles = [
        make_role(local_aws, f"{n}-{tenant}", trusting(connection.trusted_principal_arn, condition))
        for n in ("one", "two")
    ]
    local_aws.sts.latency = 0.2  # both read the connection before either stores its verdict
    results = await asyncio.gather(
        *(
            running.stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role))
            for role in roles
        ),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, pb.VerifyRoleResponse)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1, results
    assert [e.code() for e in lost] == [grpc.StatusCode.ABORTED]
    assert "VerifyRole again" in (lost[0].details() or "")
    got = await running.stub.GetConnection(pb.GetConnectionRequest(tenant_id=tenant))
    assert got.connection.role_arn == won[0].connection.role_arn
    assert got.connection.status == pb.CONNECTION_STATUS_ACTIVE


async def test_two_replicas_verifying_one_role_for_two_tenants_cannot_both_win(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A role whose trust policy the broker cannot read, admitting two tenants' external IDs,
    passes every probe for both. Two replicas (two stores) verify it for the two tenants at the
    same moment, after each saw the role free: the store's unique index lets one win; the
    other answers FAILED_PRECONDITION with the role check failed, and stays PENDING."""
    stores = [await open_store(database_url) for _ in range(2)]
    settings = ConnectionSettings(
        template_url="https://example.com/t.yaml",
        trusted_principal_arn="arn:aws:iam::111111111111:role/broker",
        default_region="us-east-1",
        session_duration=3600,
        policy_arns=(),
        verify_wait=0,
    )
    replicas = [Connections(store, None, settings) for store in stores]  # type: ignore[arg-type]
    both_checked = asyncio.Barrier(2)

    async def run_checks(self: Connections, connection: Any, role_arn: str, _: Any) -> list[Check]:
        assert await self._store.role_holder(role_arn) is None  # each sees the role free…
        await both_checked.wait()  # … before either stores its verdict
        return [Check(name, True, "passed") for name in ("role_arn_format", ROLE_NOT_SHARED)]

    monkeypatch.setattr(Connections, "_run_checks", run_checks)
    tenants = ["first", "second"]
    for replica, tenant_id in zip(replicas, tenants, strict=True):
        await replica.create(tenant_id, "", "test")
    role = "arn:aws:iam::222222222222:role/shared"
    results = await asyncio.gather(
        *(r.verify(t, role, 10, "test") for r, t in zip(replicas, tenants, strict=True)),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, Connection)]
    lost = [r for r in results if isinstance(r, VerificationFailed)]
    assert len(won) == 1, results
    assert len(lost) == 1, results
    assert [name for name, _ in lost[0].failed] == [ROLE_NOT_SHARED]
    loser = tenants[results.index(lost[0])]
    stored = await stores[0].get(loser)
    assert stored is not None
    assert stored.status is Status.PENDING
    assert not next(c for c in stored.checks if c.name == ROLE_NOT_SHARED).passed
    for store in stores:
        await store.close()


async def test_a_stream_joining_a_read_begun_before_a_disconnect_gets_nothing(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    """A new stream for a run whose mint is confirming (its store read slowed to 0.15 s, under
    BROKER_STORE_READ_TIMEOUT) while a Disconnect is acknowledged: the stream joins reads and a
    mint that began before the Disconnect, and must still send nothing but the refusal."""
    await connect(running, local_aws, tenant)
    store = running.broker.store
    real_get = store.get
    armed = asyncio.Event()
    reading = asyncio.Event()

    async def slow_get(tenant_id: str) -> Any:
        row = await real_get(tenant_id)
        if armed.is_set():
            armed.clear()
            reading.set()
            await asyncio.sleep(0.15)
        return row

    store.get = slow_get  # type: ignore[method-assign]
    local_aws.sts.latency = 1.5
    issuing = asyncio.ensure_future(
        running.stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r"))
    )
    await asyncio.sleep(1.2)
    armed.set()  # the next read is the mint's, after AssumeRole
    await reading.wait()
    stream = running.stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="r"))
    first = asyncio.ensure_future(stream.read())
    await asyncio.sleep(0.03)
    await running.stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
    assert await code_of(first) == grpc.StatusCode.FAILED_PRECONDITION
    assert await code_of(issuing) == grpc.StatusCode.FAILED_PRECONDITION
    assert len(running.broker.hub) == 0


async def test_a_role_change_while_credentials_are_minted_is_retried_not_refused(
    running: Running, local_aws: LocalAws, tenant: str
) -> None:
    """VerifyRole moves the tenant to a second role while a run's credentials are being
    minted under the first: the call and the stream get credentials of the new role (the
    broker reads the grant again), never a refusal a launcher would take as final."""
    connection = await connect(running, local_aws, tenant)
    condition = {"StringEquals": {"sts:ExternalId": connection.external_id}}
    second = make_role(
        local_aws, f"second-{tenant}", trusting(connection.trusted_principal_arn, condition)
    )
    local_aws.sts.latency = 1.0
    verifying = asyncio.ensure_future(
        running.stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=second))
    )
    await asyncio.sleep(2.6)  # the probes take about 3 s; a run asks meanwhile
    issuing = asyncio.ensure_future(
        running.stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r"))
    )
    stream = running.stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="w"))
    watching = asyncio.ensure_future(stream.read())
    assert (await verifying).connection.role_arn == second
    role_name = second.rsplit("/", 1)[1]
    issued = await issuing
    assert f"assumed-role/{role_name}/" in issued.credentials.assumed_role_arn
    watched = await watching
    assert f"assumed-role/{role_name}/" in watched.credentials.assumed_role_arn
    stream.cancel()


async def test_a_change_heard_during_a_recheck_of_the_same_tenant_is_not_lost(
    postgres_url: str,
    local_aws: LocalAws,
    tenant: str,
    template_url: str,
    broker_identity: Identity,
) -> None:
    """B re-checks a tenant slowly (its store answers in 0.5 s) after a first change; A's
    Disconnect is heard during that re-check. B must re-check once more and end its stream,
    not wait for the periodic pass."""
    settings = settings_for(postgres_url, local_aws, template_url)
    async with (
        start_broker(settings, broker_identity) as a,
        start_broker(settings, broker_identity) as b,
    ):
        await connect(a, local_aws, tenant)
        stream = b.stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="r"))
        await stream.read()
        store = b.broker.store
        real_get = store.get

        async def slow_get(tenant_id: str) -> Any:
            row = await real_get(tenant_id)
            await asyncio.sleep(0.5)
            return row

        store.get = slow_get  # type: ignore[method-assign]
        with pytest.raises(grpc.aio.AioRpcError):  # a checks-only change B hears of
            await a.stub.VerifyRole(
                pb.VerifyRoleRequest(
                    tenant_id=tenant, role_arn=f"arn:aws:iam::{CUSTOMER_ACCOUNT}:role/not-there"
                )
            )
        await asyncio.sleep(0.1)
        await a.stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))  # during B's re-check
        store.get = real_get  # type: ignore[method-assign]
        assert await code_of(asyncio.wait_for(stream.read(), 3)) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )


class _StsThatEvaluatesButNoGetRole:
    """STS answering as the trust policy says (the evaluator the emulator uses); IAM refusing
    iam:GetRole, as for a role whose own permissions lack it."""

    def __init__(self, principal: str) -> None:
        self.principal = principal
        self.document: dict[str, Any] = {}

    async def assume_role(self, request: Any) -> Credentials:
        context = {"sts:ExternalId": request.external_id, "sts:SourceIdentity": None}
        if not allows(self.document, self.principal, "sts:AssumeRole", context):
            raise RoleNotAssumable("AccessDenied: not authorized", code="AccessDenied")
        now = datetime.now(UTC)
        session = "arn:aws:sts::222222222222:assumed-role/r/x"
        return Credentials("ASIA0", "secret", "token", now + timedelta(hours=1), session, now)

    async def read_trust_policy(self, credentials: Credentials, role_arn: str) -> dict[str, Any]:
        raise RoleNotAssumable("AccessDenied: iam:GetRole", code="AccessDenied")


async def test_a_trust_policy_that_cannot_be_read_does_not_pass(tmp_path: Path) -> None:
    """`Principal: "*"` with exactly the tenant's external ID passes every probe (only we
    probe); if the role may not read its own trust policy, nothing shows the wildcard, so the
    read-back check fails and the connection stays PENDING, saying how to fix it."""
    store = await open_store(f"sqlite:///{tmp_path / 'broker.db'}")
    principal = "arn:aws:iam::111111111111:role/broker"
    aws = _StsThatEvaluatesButNoGetRole(principal)
    settings = ConnectionSettings("https://t.example", principal, "us-east-1", 3600, (), 0.0)
    connections = Connections(store, aws, settings)  # type: ignore[arg-type]
    created = await connections.create("victim", "", "test")
    aws.document = {
        "Version": "2012-10-17",
        "Statement": [
            trusting("*", {"StringEquals": {"sts:ExternalId": created.external_id}}),
        ],
    }
    with pytest.raises(VerificationFailed) as failed:
        await connections.verify("victim", "arn:aws:iam::222222222222:role/r", 30, "test")
    assert [name for name, _ in failed.value.failed] == ["trust_policy_requires_external_id"]
    assert "iam:GetRole" in failed.value.failed[0][1]
    stored = await store.get("victim")
    assert stored is not None
    assert stored.status is Status.PENDING
    await store.close()
