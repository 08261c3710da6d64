"""STS answers that are not the customer's role speaking, through the real gRPC stack with two
STS regions (a raw-answer proxy, tests/rawsts.py, in front of the first): a proxy's page, an
error without an STS code, RegionDisabledException or a body botocore cannot parse is
transient, so the call fails over and the periodic re-verification suspends nobody; an answer
cut short (it holds a secret key) never reaches a log; the broker's own credentials failing to
refresh (IRSA, Pod Identity) is UNAVAILABLE and suspends nobody; a hung region whose callers
give up before one attempt there times out still opens its breaker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from aiobotocore.credentials import AioRefreshableCredentials
from botocore.exceptions import ClientError

from broker.connections import VERIFY_SESSION_NAME
from broker.emulator import Identity, LocalAws, RegionalEndpoint
from broker.logs import FieldsFormatter
from broker.server import Broker
from broker.v1 import broker_pb2 as pb
from tests.conftest import (
    FIRST,
    SECOND,
    Running,
    StsLog,
    captured_logs,
    connect,
    settings_for,
    start_broker,
)
from tests.faults import sts_error
from tests.rawsts import RawSts
from tests.test_failover import (
    breaker,
    failover_settings,
    issue,
    issued_in,
    scrape,
)

HTML_403 = (403, "text/html", b"<html><body><h1>403 Forbidden</h1><p>blocked</p></body></html>")
HTML_403_NOT_XML = (403, "text/html", b"<!DOCTYPE html><html><body>Denied<br></body></html>")
PLAIN_429 = (429, "text/plain", b"Too Many Requests")
REGION_DISABLED = (
    403,
    "text/xml",
    sts_error(
        "RegionDisabledException",
        "STS is not activated in this region for account:111111111111. Your account "
        "administrator can activate STS in this region using the IAM Console.",
    ),
)
NON_ANSWERS = {
    "proxy-403-html": HTML_403,  # parsed as XML: an error without an STS code
    "RegionDisabledException": REGION_DISABLED,
    "proxy-403-not-xml": HTML_403_NOT_XML,  # botocore cannot parse it
    "proxy-429-plain": PLAIN_429,
}
WAIT = 15.0  # seconds: the most a test waits for the broker's background work to show


@pytest.fixture
def raw(regions: tuple[RegionalEndpoint, RegionalEndpoint]) -> Iterator[RawSts]:
    """The raw-answer proxy in front of the first region (forwarding until told otherwise)."""
    proxy = RawSts(regions[0].endpoint_url).start()
    yield proxy
    proxy.stop()


@pytest.fixture
async def via_raw(
    raw: RawSts,
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    tmp_path: Path,
) -> AsyncIterator[Running]:
    """A broker preferring the first region, through the raw proxy, then the second; its
    roles re-verified every 0.5 s."""
    settings = failover_settings(local_aws, template_url, tmp_path, first=raw.endpoint_url)
    async with start_broker(settings | {"reverify_interval": 0.5}, broker_identity) as started:
        yield started


async def status_of(running: Running, tenant: str) -> pb.Connection:
    request = pb.GetConnectionRequest(tenant_id=tenant)
    return (await running.stub.GetConnection(request)).connection


@pytest.mark.parametrize("answer", NON_ANSWERS.values(), ids=NON_ANSWERS.keys())
async def test_a_regional_non_answer_moves_the_call_to_the_next_region(
    via_raw: Running,
    raw: RawSts,
    local_aws: LocalAws,
    tenant: str,
    sts_log: StsLog,
    answer: tuple[int, str, bytes],
) -> None:
    """What the first region's endpoint says is not the role's trust policy speaking: the next
    region is asked, and the tenant's cached runs are kept (no RoleNotAssumable, no eviction,
    no INTERNAL)."""
    await connect(via_raw, local_aws, tenant)
    await issue(via_raw, tenant, "cached-before")
    raw.answer = answer
    issued = await issue(via_raw, tenant, "after")
    assert issued.access_key_id
    assert raw.requests["AssumeRole"] >= 1, "the first region was asked"
    assert issued_in(sts_log, {"after"}) == [SECOND]
    held = sorted(grant.run_id for grant in via_raw.broker.cache.grants_of(tenant))
    assert held == ["after", "cached-before"], "the tenant's cached runs were kept"


async def test_a_cut_short_answer_fails_over_and_its_secret_never_reaches_a_log(
    via_raw: Running, raw: RawSts, local_aws: LocalAws, tenant: str, sts_log: StsLog
) -> None:
    """An AssumeRole answer cut short on its way holds a secret key: botocore's parser error
    carries the body it could not parse. The broker fails over without chaining or logging
    that text."""
    await connect(via_raw, local_aws, tenant)
    raw.truncate_before = b"<SessionToken>"
    formatter = FieldsFormatter("%(levelname)s %(name)s %(message)s")
    with captured_logs(formatter, logging.INFO) as sink:
        try:
            said = "OK"
            await issue(via_raw, tenant, "cut-short")
        except grpc.aio.AioRpcError as error:
            said = f"{error.code().name}: {error.details()}"
    (body,) = raw.cut_bodies
    secret = body.split(b"<SecretAccessKey>")[1].split(b"<")[0].decode()
    assert len(secret) >= 16, body
    logged = sink.getvalue()
    assert "AssumeRole" in logged, "the failover was logged"
    leaks = sum(secret in line for line in logged.splitlines())
    assert leaks == 0, "the cut-short answer's secret access key was logged (lines counted)"
    assert secret not in said
    assert said == "OK"
    assert issued_in(sts_log, {"cut-short"}) == [FIRST, SECOND]


@pytest.mark.parametrize(
    "answer", [HTML_403, REGION_DISABLED], ids=["proxy-403-html", "RegionDisabledException"]
)
async def test_one_regions_non_answer_suspends_no_healthy_customer(
    via_raw: Running,
    raw: RawSts,
    local_aws: LocalAws,
    tenant: str,
    sts_log: StsLog,
    answer: tuple[int, str, bytes],
) -> None:
    """The periodic re-verification runs its probes through the same failover: the first
    region's non-answer fails over to the second, where the role passes, so the connection
    (held here by a watched run) stays ACTIVE through two passes."""
    connection = await connect(via_raw, local_aws, tenant)
    stream = via_raw.stub.WatchCredentials(
        pb.WatchCredentialsRequest(tenant_id=tenant, run_id="watched")
    )
    await stream.read()
    raw.answer = answer

    def passes() -> int:
        """Re-verification passes whose probe with the connection's external ID reached the
        second region (each pass also probes without it and with a wrong one)."""
        return sum(
            call.session_name == VERIFY_SESSION_NAME
            and call.role_arn == connection.role_arn
            and call.external_id == connection.external_id
            and call.region == SECOND
            for call in sts_log.now()
        )

    # A second pass's probe means the first pass finished (passes run one after another).
    deadline = time.monotonic() + WAIT
    while passes() < 2 and time.monotonic() < deadline:
        got = await status_of(via_raw, tenant)
        if got.status != pb.CONNECTION_STATUS_ACTIVE:
            break
        await asyncio.sleep(0.1)
    got = await status_of(via_raw, tenant)
    stream.cancel()
    assert got.status == pb.CONNECTION_STATUS_ACTIVE, (
        pb.ConnectionStatus.Name(got.status),
        [(c.name, c.passed, c.detail) for c in got.checks],
    )
    assert passes() >= 2, f"no two re-verification passes within {WAIT} s"


def break_own_identity(broker: Broker) -> None:
    """From now on the broker's STS clients cannot refresh their own credentials: the web
    identity exchange answers AccessDenied (say, the IRSA role's trust policy was edited)."""

    async def refresh() -> dict[str, str]:
        raise ClientError(
            {
                "Error": {
                    "Code": "AccessDenied",
                    "Message": "Not authorized to perform sts:AssumeRoleWithWebIdentity",
                }
            },
            "AssumeRoleWithWebIdentity",
        )

    expired = datetime.now(UTC) - timedelta(minutes=1)
    for region in broker.aws._regions:
        assert region.client is not None
        region.client._request_signer._credentials = AioRefreshableCredentials(  # type: ignore[attr-defined]
            "AKIAEXPIRED", "x", "y", expired, refresh, "assume-role-with-web-identity"
        )


async def test_the_broker_losing_its_own_identity_is_unavailable_and_suspends_nobody(
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    tmp_path: Path,
    tenant: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ClientError raised while botocore refreshes the broker's OWN credentials is not the
    customer's role refusing us: a new run is UNAVAILABLE (retryable), and the periodic
    re-verification cannot re-check now and leaves the connection ACTIVE."""
    caplog.set_level(logging.WARNING, logger="broker.connections")
    settings = settings_for(f"sqlite:///{tmp_path / 'broker.db'}", local_aws, template_url)
    async with start_broker(settings | {"reverify_interval": 0.5}, broker_identity) as running:
        await connect(running, local_aws, tenant)
        stream = running.stub.WatchCredentials(
            pb.WatchCredentialsRequest(tenant_id=tenant, run_id="watched")
        )
        await stream.read()  # a launcher watching a run: the tenant is held here
        break_own_identity(running.broker)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await issue(running, tenant, "new-run")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert "own AWS credentials" in (refused.value.details() or "")

        def rechecks_put_off() -> int:
            return sum(
                r.getMessage() == "cannot re-check the role now"
                and getattr(r, "tenant", None) == tenant
                for r in caplog.records
            )

        deadline = time.monotonic() + WAIT
        while rechecks_put_off() < 1 and time.monotonic() < deadline:
            if (await status_of(running, tenant)).status != pb.CONNECTION_STATUS_ACTIVE:
                break
            await asyncio.sleep(0.1)
        got = await status_of(running, tenant)
        stream.cancel()
        assert got.status == pb.CONNECTION_STATUS_ACTIVE, (
            "a customer suspended for the broker's fault",
            [(c.name, c.passed, c.detail) for c in got.checks],
        )
        assert rechecks_put_off() >= 1, f"no re-verification pass within {WAIT} s"


async def test_callers_giving_up_before_a_hung_regions_timeout_open_its_breaker(
    regions: tuple[RegionalEndpoint, RegionalEndpoint],
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    tmp_path: Path,
    tenant: str,
    sts_log: StsLog,
) -> None:
    """Each caller gives up after 1.8 s, less than one 2 s attempt in the hung region, so no
    attempt there ever times out. The first caller is lost to it; having kept that caller past
    a healthy answer's time, the region's breaker opens, and the next callers are issued in
    the second region."""
    settings = failover_settings(local_aws, template_url, tmp_path)
    async with start_broker(settings, broker_identity) as running:
        await connect(running, local_aws, tenant)
        regions[0].hang()
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await issue(running, tenant, "lost", timeout=1.8)
        assert lost.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        runs = {f"short-{i}" for i in range(3)}
        for run in sorted(runs):
            try:
                await issue(running, tenant, run, timeout=1.8)
            except grpc.aio.AioRpcError as error:
                pytest.fail(f"{run} was lost to the hung region too: {error.code().name}")
        assert issued_in(sts_log, runs) == [SECOND] * len(runs)
        assert breaker(await scrape(running), FIRST) == "open"
