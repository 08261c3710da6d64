"""Fair share (quotas.py), through gRPC: each limit refuses with RESOURCE_EXHAUSTED naming it
(QuotaFailure, ErrorInfo, and RetryInfo where waiting helps), counts in broker_limit_hits,
leaves every other tenant and caller alone, and lets the same call through once there is room.

The limits live in each replica's memory, whatever the store: these run on SQLite alone."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from broker import quotas
from broker.auth import CallerLimits, Policy, hash_token, new_token
from broker.client import BrokerClient
from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running, StsLog, connect, metrics_text, settings_for, start_broker
from tests.faults import FaultyAws


@pytest.fixture
def base(local_aws: LocalAws, template_url: str, tmp_path: Path) -> dict[str, Any]:
    return settings_for(f"sqlite:///{tmp_path / 'broker.db'}", local_aws, template_url)


@contextlib.asynccontextmanager
async def broker_with(
    base: dict[str, Any], identity: Identity, **limits: Any
) -> AsyncIterator[Running]:
    async with start_broker(base | limits, identity) as running:
        yield running


def details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The rich status's details by type: QuotaFailure, ErrorInfo, RetryInfo."""
    found: dict[str, Any] = {}
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for packed in status.details:
                for kind in (
                    error_details_pb2.QuotaFailure,
                    error_details_pb2.ErrorInfo,
                    error_details_pb2.RetryInfo,
                ):
                    if packed.Is(kind.DESCRIPTOR):
                        detail = kind()
                        packed.Unpack(detail)
                        found[kind.DESCRIPTOR.name] = detail
    return found


def assert_quota(
    error: grpc.aio.AioRpcError, limit: str, subject: str, *, retry: bool
) -> dict[str, Any]:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    found = details(error)
    (violation,) = found["QuotaFailure"].violations
    assert violation.subject == subject
    assert violation.description.startswith(f"{limit}: ")
    assert found["ErrorInfo"].domain == "broker.v1"
    assert found["ErrorInfo"].metadata["limit"] == limit
    assert ("RetryInfo" in found) is retry
    if retry:
        delay = found["RetryInfo"].retry_delay
        assert delay.seconds + delay.nanos / 1e9 > 0
    return found


async def limit_hits(running: Running, limit: str) -> float:
    for line in (await metrics_text(running)).splitlines():
        if line.startswith(f'broker_limit_hits_total{{limit="{limit}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no broker_limit_hits_total for {limit}")


def watch(running: Running, tenant: str, run: str, **kwargs: Any) -> Any:
    return running.stub.WatchCredentials(
        pb.WatchCredentialsRequest(tenant_id=tenant, run_id=run), **kwargs
    )


async def test_a_tenant_at_its_stream_limit_is_refused_and_others_are_not(
    base: dict[str, Any], broker_identity: Identity, local_aws: LocalAws
) -> None:
    async with broker_with(base, broker_identity, tenant_max_streams=2) as running:
        await connect(running, local_aws, "noisy")
        await connect(running, local_aws, "quiet")
        open_ = [watch(running, "noisy", f"r{i}") for i in range(2)]
        for stream in open_:
            await stream.read()
        refused = watch(running, "noisy", "r2")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await refused.read()
        assert_quota(caught.value, "BROKER_TENANT_MAX_STREAMS", "tenant:noisy", retry=False)
        assert "ReleaseCredentials" in (caught.value.details() or "")
        # Another tenant's streams open as ever; the noisy one's open again once one closes.
        quiet = watch(running, "quiet", "r0")
        assert (await quiet.read()).credentials.access_key_id
        open_[0].cancel()
        for _ in range(100):
            if len(running.broker.hub) == 2:
                break
            await asyncio.sleep(0.02)
        again = watch(running, "noisy", "r2")
        assert (await again.read()).credentials.access_key_id
        assert await limit_hits(running, "tenant_streams") == 1
        for stream in (open_[1], quiet, again):
            stream.cancel()


async def test_a_stream_refused_for_its_caller_counts_for_nothing(
    base: dict[str, Any], broker_identity: Identity, local_aws: LocalAws
) -> None:
    """Streams of one caller across tenants; a refused stream holds no share (the tenant's
    count is not left raised by the caller's refusal)."""
    async with broker_with(
        base, broker_identity, caller_max_streams=2, tenant_max_streams=2
    ) as running:
        for tenant in ("acme", "globex"):
            await connect(running, local_aws, tenant)
        first, second = watch(running, "acme", "a"), watch(running, "globex", "g")
        await first.read()
        await second.read()
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await watch(running, "acme", "b").read()
            assert_quota(
                caught.value, "BROKER_CALLER_MAX_STREAMS", "caller:anonymous@loopback", retry=False
            )
        second.cancel()
        for _ in range(100):
            if len(running.broker.hub) == 1:
                break
            await asyncio.sleep(0.02)
        third = watch(running, "acme", "b")
        assert (await third.read()).credentials.access_key_id  # acme: 2 of 2, none leaked
        assert await limit_hits(running, "caller_streams") == 3
        first.cancel()
        third.cancel()


async def test_the_policy_file_gives_a_caller_its_own_stream_limit(
    base: dict[str, Any], broker_identity: Identity, local_aws: LocalAws, tmp_path: Path
) -> None:
    small, large = new_token(), new_token()
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[caller]]\nidentity = "token:small"\nrpcs = ["all"]\nlimits = { max_streams = 1 }\n'
        '[[caller]]\nidentity = "token:large"\nrpcs = ["all"]\n'
    )
    async with broker_with(
        base,
        broker_identity,
        token_hashes=f"small={hash_token(small)},large={hash_token(large)}",
        policy_file=str(policy),
    ) as running:
        as_small = (("authorization", f"Bearer {small}"),)
        as_large = (("authorization", f"Bearer {large}"),)
        created = await running.stub.CreateConnection(
            pb.CreateConnectionRequest(tenant_id="acme"), metadata=as_small
        )
        role_arn = local_aws.create_customer_stack(created.connection.quick_create_url)
        await running.stub.VerifyRole(
            pb.VerifyRoleRequest(tenant_id="acme", role_arn=role_arn), metadata=as_small
        )
        held = watch(running, "acme", "a", metadata=as_small)
        await held.read()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await watch(running, "acme", "b", metadata=as_small).read()
        assert_quota(caught.value, "BROKER_CALLER_MAX_STREAMS", "caller:token:small", retry=False)
        others = [watch(running, "acme", f"l{i}", metadata=as_large) for i in range(3)]
        for stream in others:
            await stream.read()  # the default limit (20,000) for token:large
        for stream in (held, *others):
            stream.cancel()


async def test_verify_role_in_flight_per_tenant(
    base: dict[str, Any], broker_identity: Identity, local_aws: LocalAws
) -> None:
    """A VerifyRole that keeps retrying (the role does not exist yet) holds the tenant's one
    slot: a second for that tenant is refused at once with a RetryInfo, another tenant's runs."""
    async with broker_with(
        base, broker_identity, tenant_verify_concurrency=1, verify_wait=3.0
    ) as running:
        missing = "arn:aws:iam::111122223333:role/not-there-yet"
        for tenant in ("slow", "other"):
            await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
        first = asyncio.ensure_future(
            running.stub.VerifyRole(pb.VerifyRoleRequest(tenant_id="slow", role_arn=missing))
        )
        await asyncio.sleep(0.5)
        assert not first.done()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await running.stub.VerifyRole(pb.VerifyRoleRequest(tenant_id="slow", role_arn=missing))
        assert time.monotonic() - started < 2.0  # refused, not queued behind the first
        assert_quota(caught.value, "BROKER_TENANT_VERIFY_CONCURRENCY", "tenant:slow", retry=True)
        connected = await connect(running, local_aws, "other")
        assert connected.status == pb.CONNECTION_STATUS_ACTIVE
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await first
        assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # The slot is free again.
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await running.stub.VerifyRole(
                pb.VerifyRoleRequest(tenant_id="slow", role_arn=missing), timeout=1.5
            )
        assert again.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await limit_hits(running, "tenant_verify") == 1


async def test_tenants_created_per_caller(
    base: dict[str, Any], broker_identity: Identity, tmp_path: Path
) -> None:
    """A caller's new tenants are paced; asking again for one it made (PENDING) is not a new
    tenant; another caller has its own bucket."""
    ui, other = new_token(), new_token()
    async with broker_with(
        base,
        broker_identity,
        caller_tenant_rate=0.01,
        caller_tenant_burst=3,
        token_hashes=f"ui={hash_token(ui)},other={hash_token(other)}",
        policy="token:ui=connections; token:other=connections",
    ) as running:
        as_ui = (("authorization", f"Bearer {ui}"),)
        for i in range(3):
            await running.stub.CreateConnection(
                pb.CreateConnectionRequest(tenant_id=f"t{i}"), metadata=as_ui
            )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await running.stub.CreateConnection(
                pb.CreateConnectionRequest(tenant_id="t3"), metadata=as_ui
            )
        found = assert_quota(
            caught.value, "BROKER_CALLER_TENANT_RATE", "caller:token:ui", retry=True
        )
        assert found["RetryInfo"].retry_delay.seconds >= 90  # 1 token at 0.01/s
        again = await running.stub.CreateConnection(
            pb.CreateConnectionRequest(tenant_id="t0"), metadata=as_ui
        )
        assert again.connection.status == pb.CONNECTION_STATUS_PENDING
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await running.stub.GetConnection(
                pb.GetConnectionRequest(tenant_id="t3"), metadata=as_ui
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was stored
        await running.stub.CreateConnection(
            pb.CreateConnectionRequest(tenant_id="o0"),
            metadata=(("authorization", f"Bearer {other}"),),
        )
        assert await limit_hits(running, "caller_tenant_rate") == 1


async def test_new_sessions_per_tenant_and_cached_answers_are_never_limited(
    base: dict[str, Any], broker_identity: Identity, local_aws: LocalAws, sts_log: StsLog
) -> None:
    async with broker_with(
        base, broker_identity, tenant_sts_rate=0.01, tenant_sts_burst=3
    ) as running:
        for tenant in ("noisy", "quiet"):
            await connect(running, local_aws, tenant)
        before = len(sts_log.now())

        def issue(tenant: str, run: str) -> Any:
            return running.stub.IssueCredentials(
                pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run)
            )

        first = [await issue("noisy", f"r{i}") for i in range(3)]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await issue("noisy", "r3")
        assert_quota(caught.value, "BROKER_TENANT_STS_RATE", "tenant:noisy", retry=True)
        assert len(sts_log.now()) - before == 3  # the refused run cost no AssumeRole
        for _ in range(20):  # cached runs: answered however often, never limited
            for i, had in enumerate(first):
                again = await issue("noisy", f"r{i}")
                assert again.credentials.access_key_id == had.credentials.access_key_id
        assert (await issue("quiet", "q0")).credentials.access_key_id  # its own bucket
        assert await limit_hits(running, "tenant_sts_rate") == 1


async def test_one_tenant_holds_at_most_its_share_of_sts_slots(
    base: dict[str, Any], broker_identity: Identity, local_aws: LocalAws
) -> None:
    """With STS slow, a tenant's burst of new runs holds at most BROKER_TENANT_STS_CONCURRENCY
    of the broker's slots, so another tenant's new run, asked after the burst, is answered
    before the burst is (without the share it would queue behind all of it)."""
    faults = FaultyAws(local_aws.endpoint_url).start()
    try:
        async with broker_with(
            base | {"aws_endpoint_url": faults.endpoint_url},
            broker_identity,
            sts_max_concurrency=4,
            tenant_sts_concurrency=2,
            tenant_sts_burst=100,
        ) as running:
            await connect(running, local_aws, "noisy")
            await connect(running, local_aws, "quiet")
            faults.inject("latency", seconds=0.3)
            done: list[str] = []

            async def issue(tenant: str, run: str) -> None:
                await running.stub.IssueCredentials(
                    pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run)
                )
                done.append(tenant)

            burst = [asyncio.ensure_future(issue("noisy", f"r{i}")) for i in range(8)]
            await asyncio.sleep(0.1)
            await issue("quiet", "q")
            await asyncio.gather(*burst)
            assert done.index("quiet") < len(done) - 1 - done[::-1].index("noisy")
            assert faults.most_in_flight <= 3  # the noisy tenant's 2, and the quiet one's 1
            assert await limit_hits(running, "tenant_sts_concurrency") >= 1
    finally:
        faults.stop()


def test_bucket_memory_is_bounded_whatever_the_number_of_keys() -> None:
    now = [0.0]
    buckets = quotas.Buckets(lambda _: (1.0, 2), lambda: now[0])
    for i in range(quotas.MAX_IDLE_BUCKETS * 3):
        buckets.take(f"tenant-{i}")
        now[0] += 1.0  # each is full again a second later
    assert len(buckets) <= quotas.MAX_IDLE_BUCKETS


def test_a_bucket_refills_at_its_rate_and_never_past_its_burst() -> None:
    bucket = quotas.TokenBucket(2.0, 3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0
    bucket.refill(100.0)
    assert bucket.tokens == 3.0


@pytest.mark.parametrize(
    ("limits", "refusal"),
    [
        ('{ max_streams = "5" }', "must be a whole number"),
        ("{ max_streams = 5.5 }", "must be a whole number"),
        ("{ max_streams = true }", "must be a whole number"),
        ("{ max_streams = 0 }", "at least 1"),
        ("{ max_streams = -1 }", "at least 1"),
        ("{ tenant_rate = nan }", "at least"),
        ("{ tenant_rate = inf }", "finite"),
        ("{ tenant_rate = 0 }", "at least"),
        ("{ max_stream = 5 }", "unknown limit max_stream"),
        ("{ Max_Streams = 5 }", "unknown limit Max_Streams"),
        ('"max_streams=5"', "must be a table"),
        ("[5]", "must be a table"),
    ],
)
def test_a_doubtful_limit_in_the_policy_file_is_refused(limits: str, refusal: str) -> None:
    text = f'[[caller]]\nidentity = "token:x"\nrpcs = ["all"]\nlimits = {limits}\n'
    with pytest.raises(ValueError, match=refusal):
        Policy.from_toml(text)


def test_policy_file_limits_are_read() -> None:
    policy = Policy.from_toml(
        '[[caller]]\nidentity = "token:x"\nrpcs = ["all"]\n'
        "limits = { max_streams = 7, tenant_rate = 0.5, tenant_burst = 2 }\n"
    )
    assert policy.limits == {
        "token:x": CallerLimits(max_streams=7, tenant_rate=0.5, tenant_burst=2)
    }


async def test_the_client_waits_as_long_as_retry_info_asks(
    base: dict[str, Any], broker_identity: Identity, local_aws: LocalAws
) -> None:
    """BrokerClient takes RetryInfo as the least it waits: a refused new run is asked again
    once, after the bucket has a token, not hammered on its own backoff (0.2 s at first)."""
    async with broker_with(
        base, broker_identity, tenant_sts_rate=1.5, tenant_sts_burst=1
    ) as running:
        await connect(running, local_aws, "acme")
        async with BrokerClient(running.address, connect_timeout=10) as client:
            await client.issue_credentials("acme", "r0")
            second = await client.issue_credentials("acme", "r1")
        assert second.access_key_id
        assert await limit_hits(running, "tenant_sts_rate") == 1


async def test_a_streams_renewal_is_never_charged_as_a_new_session(
    base: dict[str, Any], broker_identity: Identity, local_aws: LocalAws
) -> None:
    """A stream's cache entry evicted (the cache is full, the tenant came to hold its share
    first): at the stream's renewal the cache holds nothing for the run, yet the renewal is
    not a new run, so the tenant's spent new-session bucket does not end the stream."""
    async with broker_with(
        base, broker_identity, cache_max_entries=1, tenant_sts_burst=1, tenant_sts_rate=0.01
    ) as running:
        await connect(running, local_aws, "a")
        await connect(running, local_aws, "b")
        local_aws.sts.session_lifetime = 4  # the stream renews within about 2 s
        stream = watch(running, "a", "s")
        first = await stream.read()
        await running.stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id="b", run_id="b"))
        assert running.broker.cache.grants_of("a") == [], "a's entry was evicted"
        try:
            renewed = await asyncio.wait_for(stream.read(), 10)
        except grpc.aio.AioRpcError as error:
            raise AssertionError(
                f"the stream ended {error.code().name}: {error.details()}"
            ) from None
        assert renewed.credentials.access_key_id != first.credentials.access_key_id
        assert await limit_hits(running, "tenant_sts_rate") == 0
        stream.cancel()


async def test_stream_counts_return_to_zero_whatever_ends_the_streams(
    base: dict[str, Any], broker_identity: Identity, local_aws: LocalAws
) -> None:
    """400 streams of one tenant and caller end every way a stream ends (cancelled before or
    after its first message, its run released, the tenant disconnected), many at once. Then
    the tenant holds its whole share again, exactly: `most` streams open and one more is
    refused for the tenant; one of another tenant opens, and one more is refused for the
    caller (`most` + 1)."""
    most = 420  # at least as many as are ever open at once here
    async with broker_with(
        base, broker_identity, tenant_max_streams=most, caller_max_streams=most + 1
    ) as running:
        await connect(running, local_aws, "acme")
        await connect(running, local_aws, "globex")

        async def one(i: int) -> None:
            run = f"r{i % 40}"
            stream = watch(running, "acme", run)
            try:
                if i % 4 == 0:  # at any moment, often before the first message
                    await asyncio.sleep(i % 7 * 0.005)
                    stream.cancel()
                elif i % 4 == 1:
                    await stream.read()
                    stream.cancel()
                elif i % 4 == 2:  # its run released: the stream ends
                    await stream.read()
                    await running.stub.ReleaseCredentials(
                        pb.ReleaseCredentialsRequest(tenant_id="acme", run_id=run)
                    )
                    await stream.read()
                else:
                    await stream.read()
                    await asyncio.sleep(i % 5 * 0.005)
                    stream.cancel()
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass

        await asyncio.gather(*(one(i) for i in range(400)))
        left = [watch(running, "acme", f"z{i}") for i in range(20)]
        for stream in left:
            await stream.read()
        await running.stub.Disconnect(pb.DisconnectRequest(tenant_id="acme"))
        for stream in left:
            with pytest.raises(grpc.aio.AioRpcError):
                await stream.read()
        for _ in range(500):  # the server ends each cancelled stream in its own time
            if len(running.broker.hub) == 0:
                break
            await asyncio.sleep(0.02)
        assert len(running.broker.hub) == 0

        await connect(running, local_aws, "acme")
        full = [watch(running, "acme", f"again-{i % 4}") for i in range(most)]
        for stream in full:
            assert (await stream.read()).credentials.access_key_id
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await watch(running, "acme", "one-more").read()
        assert_quota(caught.value, "BROKER_TENANT_MAX_STREAMS", "tenant:acme", retry=False)
        other = watch(running, "globex", "g")
        assert (await other.read()).credentials.access_key_id
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await watch(running, "globex", "g2").read()
        assert_quota(
            caught.value, "BROKER_CALLER_MAX_STREAMS", "caller:anonymous@loopback", retry=False
        )
        for stream in [*full, other]:
            stream.cancel()
