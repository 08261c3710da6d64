"""STS regional failover (BROKER_STS_REGIONS), through the real gRPC stack against the emulator
serving each region on an endpoint of its own: a region down, hung or throttled costs no
issuance; its breaker keeps calls off it until the cooldown, then traffic returns; a refusal is
never put to another region; every region down is UNAVAILABLE while cached credentials are
still served; the metrics say which region answered. Also the breaker's choice of region (a
unit table), the settings an attacker or a typo could give, and `broker dev` with regions."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import grpc
import pytest
from botocore.exceptions import ClientError
from prometheus_client.parser import text_string_to_metric_families

from broker.aws import FAILOVER_CONFIG, Region, pick
from broker.config import ConfigError, load_settings
from broker.emulator import CUSTOMER_ACCOUNT, Identity, LocalAws, RegionalEndpoint
from broker.v1 import broker_pb2 as pb
from tests.conftest import (
    FIRST,
    SECOND,
    Running,
    StsLog,
    connect,
    metrics_text,
    settings_for,
    start_broker,
)
from tests.faults import FaultyAws
from tests.processes import BIN
from tests.test_cli import SERVICE, Dev, run
from tests.test_observability import enumerated

ATTEMPTS = FAILOVER_CONFIG.retries["total_max_attempts"]  # botocore's, in each region


def failover_settings(
    local_aws: LocalAws, template_url: str, tmp_path: Path, **endpoints: str
) -> dict[str, Any]:
    """A broker on SQLite preferring FIRST, then SECOND, at their emulator endpoints (or at
    `endpoints`, keyed first/second: a fault proxy in front of one)."""
    urls = {
        FIRST: endpoints.get("first", local_aws.regions[FIRST].endpoint_url),
        SECOND: endpoints.get("second", local_aws.regions[SECOND].endpoint_url),
    }
    return settings_for(f"sqlite:///{tmp_path / 'broker.db'}", local_aws, template_url) | {
        "sts_regions": f"{FIRST},{SECOND}",
        "sts_endpoint_urls": ",".join(f"{region}={url}" for region, url in urls.items()),
    }


@pytest.fixture
async def running(
    regions: tuple[RegionalEndpoint, RegionalEndpoint],
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    tmp_path: Path,
) -> AsyncIterator[Running]:
    """A broker with two STS regions (cooldown: the default, 30 s)."""
    settings = failover_settings(local_aws, template_url, tmp_path)
    async with start_broker(settings, broker_identity) as started:
        yield started


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(running: Running) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(await metrics_text(running))
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def breaker(samples: Samples, region: str) -> str:
    """The state broker_sts_region_breaker shows for `region` (exactly one is 1)."""
    (state,) = (
        dict(labels)["state"]
        for (name, labels), shown in samples.items()
        if name == "broker_sts_region_breaker" and dict(labels)["region"] == region and shown
    )
    return state


async def issue(running: Running, tenant: str, run: str, **kwargs: Any) -> pb.Credentials:
    request = pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run)
    return (await running.stub.IssueCredentials(request, **kwargs)).credentials


def issued_in(sts_log: StsLog, runs: set[str]) -> list[str]:
    """The region of each AssumeRole the emulator saw for `runs` (session names)."""
    return [call.region for call in sts_log.now() if call.session_name in runs]


async def test_one_region_down_every_new_run_is_issued_in_the_next(
    running: Running,
    regions: tuple[RegionalEndpoint, RegionalEndpoint],
    local_aws: LocalAws,
    tenant: str,
    sts_log: StsLog,
) -> None:
    await connect(running, local_aws, tenant)
    before = await scrape(running)
    regions[0].down()
    runs = {f"run-{i}" for i in range(40)}
    issued = await asyncio.gather(*(issue(running, tenant, run) for run in sorted(runs)))

    assert len({credentials.access_key_id for credentials in issued}) == len(runs), "0 failed"
    assert issued_in(sts_log, runs) == [SECOND] * len(runs)
    after = await scrape(running)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("broker_sts_region_calls_total", region=SECOND, outcome="ok") == len(runs)
    assert grew("broker_sts_region_calls_total", region=FIRST, outcome="ok") == 0
    assert grew("broker_sts_region_calls_total", region=FIRST, outcome="transient") >= 1
    assert grew("broker_sts_failovers_total", region=FIRST) >= 1
    assert grew("broker_sts_failovers_total", region=SECOND) == 0
    assert grew("broker_sts_calls_total", outcome="ok") == len(runs)
    assert grew("broker_sts_calls_total", outcome="transient") == 0
    assert breaker(after, FIRST) == "open"
    assert breaker(after, SECOND) == "closed"


async def test_the_breaker_keeps_calls_off_a_failing_region(
    regions: tuple[RegionalEndpoint, RegionalEndpoint],
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    tmp_path: Path,
    tenant: str,
    sts_log: StsLog,
) -> None:
    """A region answering 503: one call's attempts there, then none for the cooldown (30 s),
    however many calls come; without the breaker each call would try it first."""
    faults = FaultyAws(regions[0].endpoint_url).start()
    settings = failover_settings(local_aws, template_url, tmp_path, first=faults.endpoint_url)
    try:
        async with start_broker(settings, broker_identity) as running:
            await connect(running, local_aws, tenant)
            seen = faults.requests["AssumeRole"]
            faults.inject("error")
            runs = {f"run-{i}" for i in range(10)}
            for run in sorted(runs):
                await issue(running, tenant, run)
            assert faults.requests["AssumeRole"] - seen == ATTEMPTS  # the first call's alone
            assert issued_in(sts_log, runs) == [SECOND] * len(runs)
    finally:
        faults.stop()


async def test_after_the_cooldown_traffic_returns_to_the_first_region(
    regions: tuple[RegionalEndpoint, RegionalEndpoint],
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    tmp_path: Path,
    tenant: str,
    sts_log: StsLog,
) -> None:
    settings = failover_settings(local_aws, template_url, tmp_path) | {"sts_region_cooldown": 0.5}
    async with start_broker(settings, broker_identity) as running:
        await connect(running, local_aws, tenant)
        regions[0].down()
        await issue(running, tenant, "while-down")
        assert breaker(await scrape(running), FIRST) in {"open", "half_open"}
        regions[0].up()
        deadline = time.monotonic() + 10
        while breaker(await scrape(running), FIRST) != "half_open":
            assert time.monotonic() < deadline, "the cooldown never ended"
            await asyncio.sleep(0.1)
        await issue(running, tenant, "trial")  # the half-open trial: it answers
        await issue(running, tenant, "back")
        assert breaker(await scrape(running), FIRST) == "closed"
        assert issued_in(sts_log, {"while-down", "trial", "back"}) == [SECOND, FIRST, FIRST]


@pytest.mark.parametrize(
    ("refusal", "status"),
    [
        ("trust policy", grpc.StatusCode.FAILED_PRECONDITION),
        ("AccessDenied", grpc.StatusCode.FAILED_PRECONDITION),
        ("ValidationError", grpc.StatusCode.FAILED_PRECONDITION),
        ("InvalidClientTokenId", grpc.StatusCode.UNAVAILABLE),  # the broker's own identity
    ],
)
async def test_a_refusal_is_never_put_to_another_region(
    regions: tuple[RegionalEndpoint, RegionalEndpoint],
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    tmp_path: Path,
    tenant: str,
    sts_log: StsLog,
    refusal: str,
    status: grpc.StatusCode,
) -> None:
    """A permanent answer in the first region ends the call there, the second never asked:
    the role's trust policy no longer naming us (the emulator judges it), or the first
    region answering AccessDenied, ValidationError or InvalidClientTokenId (the fault proxy)."""
    faults = FaultyAws(regions[0].endpoint_url).start()
    settings = failover_settings(local_aws, template_url, tmp_path, first=faults.endpoint_url)
    try:
        async with start_broker(settings, broker_identity) as running:
            connection = await connect(running, local_aws, tenant)
            if refusal == "trust policy":
                someone_else = {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"AWS": "arn:aws:iam::333333333333:root"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
                local_aws.client("iam", CUSTOMER_ACCOUNT).update_assume_role_policy(
                    RoleName=connection.role_arn.rsplit("/", 1)[1],
                    PolicyDocument=json.dumps(someone_else),
                )
            else:
                faults.inject("refuse", code=refusal)
            seen = faults.requests["AssumeRole"]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await issue(running, tenant, "refused")
            assert refused.value.code() == status
            assert faults.requests["AssumeRole"] - seen == 1, "no retry, in it or elsewhere"
            judged = [FIRST] if refusal == "trust policy" else []  # or refused by the proxy
            assert issued_in(sts_log, {"refused"}) == judged
            samples = await scrape(running)
            assert value(samples, "broker_sts_region_calls_total", region=SECOND, outcome="ok") == 0
            for outcome in ("denied", "transient"):
                assert not value(
                    samples, "broker_sts_region_calls_total", region=SECOND, outcome=outcome
                )
            assert value(samples, "broker_sts_failovers_total", region=FIRST) == 0
            assert breaker(samples, FIRST) == "closed", "a refusal is an answer: it is healthy"
    finally:
        faults.stop()


async def test_a_throttled_region_hands_its_calls_to_the_next(
    regions: tuple[RegionalEndpoint, RegionalEndpoint],
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    tmp_path: Path,
    tenant: str,
    sts_log: StsLog,
) -> None:
    faults = FaultyAws(regions[0].endpoint_url).start()
    settings = failover_settings(local_aws, template_url, tmp_path, first=faults.endpoint_url)
    try:
        async with start_broker(settings, broker_identity) as running:
            await connect(running, local_aws, tenant)
            faults.inject("throttle")
            await issue(running, tenant, "throttled")
            assert faults.faults["throttle"] == ATTEMPTS  # botocore's retries, then the next
            assert issued_in(sts_log, {"throttled"}) == [SECOND]
            samples = await scrape(running)
            assert value(samples, "broker_sts_failovers_total", region=FIRST) == 1
            assert breaker(samples, FIRST) == "open"
    finally:
        faults.stop()


async def test_a_hung_region_costs_a_call_two_short_timeouts(
    running: Running,
    regions: tuple[RegionalEndpoint, RegionalEndpoint],
    local_aws: LocalAws,
    tenant: str,
    sts_log: StsLog,
) -> None:
    """A region that takes requests and never answers: the call moves on after its two
    attempts of 2 s (botocore's single-region default would be three of 5 s, and fail this
    call's deadline). The first attempt's timeout opens the breaker, so a call that starts
    while the first makes its second attempt goes straight to the next region."""
    await connect(running, local_aws, tenant)
    regions[0].hang()
    hung = asyncio.create_task(issue(running, tenant, "hung", timeout=12))
    try:
        deadline = time.monotonic() + 10
        while breaker(await scrape(running), FIRST) != "open":
            assert time.monotonic() < deadline, "no attempt timed out"
            await asyncio.sleep(0.1)
        await issue(running, tenant, "meanwhile", timeout=12)
        assert not hung.done(), "the first call is still on its second attempt there"
    finally:
        await asyncio.gather(hung, return_exceptions=True)
    await hung
    assert sorted(issued_in(sts_log, {"hung", "meanwhile"})) == [SECOND, SECOND]


async def test_every_region_down_is_unavailable_and_cached_credentials_are_still_served(
    regions: tuple[RegionalEndpoint, RegionalEndpoint],
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    tmp_path: Path,
    tenant: str,
) -> None:
    """Credentials of 10 s, renewed from the advisory point (5 s) on: past it, with every
    region down, the run's credentials are still served (they have seconds left), and a new
    run is UNAVAILABLE, naming each region and why."""
    settings = failover_settings(local_aws, template_url, tmp_path)
    async with start_broker(settings, broker_identity) as running:
        await connect(running, local_aws, tenant)
        local_aws.sts.session_lifetime = 10
        cached = await issue(running, tenant, "cached")
        for region in regions:
            region.down()
        while time.time() < cached.expiration.ToSeconds() - 4.5:
            await asyncio.sleep(0.1)  # past the advisory point: a renewal is due
        again = await issue(running, tenant, "cached")
        assert again.access_key_id == cached.access_key_id
        with pytest.raises(grpc.aio.AioRpcError) as unavailable:
            await issue(running, tenant, "new")
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        said = unavailable.value.details() or ""
        assert "every STS region" in said
        assert f"{FIRST}: EndpointConnectionError" in said
        assert f"{SECOND}: EndpointConnectionError" in said
        samples = await scrape(running)
        assert {breaker(samples, FIRST), breaker(samples, SECOND)} == {"open"}


async def test_the_broker_learns_its_identity_from_the_next_region(
    regions: tuple[RegionalEndpoint, RegionalEndpoint],
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    tmp_path: Path,
    tenant: str,
) -> None:
    """At start-up, GetCallerIdentity (no BROKER_TRUSTED_PRINCIPAL_ARN) fails over too."""
    regions[0].down()
    settings = failover_settings(local_aws, template_url, tmp_path)
    assert "trusted_principal_arn" not in settings
    async with start_broker(settings, broker_identity) as running:
        created = await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
        assert created.connection.trusted_principal_arn == broker_identity.arn
        assert breaker(await scrape(running), FIRST) == "open"


async def test_region_metrics_are_bounded_and_their_help_names_their_values(
    running: Running,
    regions: tuple[RegionalEndpoint, RegionalEndpoint],
    local_aws: LocalAws,
    tenant: str,
) -> None:
    """The per-region families follow broker_sts_calls' conventions: each value of an
    enumerated label is named in the HELP text, shown from the start; `region` takes the
    configured regions alone; each region is in exactly one breaker state."""
    await connect(running, local_aws, tenant)
    regions[0].down()
    await issue(running, tenant, "r")
    text = await metrics_text(running)
    named = enumerated(text)
    assert named["broker_sts_region_calls"] == (
        "outcome",
        {"ok", "denied", "transient", "abandoned"},
    )
    assert named["broker_sts_region_breaker"] == ("state", {"closed", "open", "half_open"})
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("broker_sts_region_calls", "broker_sts_failovers", "broker_sts_region_breaker"):
        shown = {sample.labels["region"] for sample in families[name].samples}
        assert shown == {FIRST, SECOND}, name
    shown_outcomes = {s.labels["outcome"] for s in families["broker_sts_region_calls"].samples}
    assert shown_outcomes == named["broker_sts_region_calls"][1], "every outcome from the start"
    for region in (FIRST, SECOND):
        states = [
            s.value
            for s in families["broker_sts_region_breaker"].samples
            if s.labels["region"] == region
        ]
        assert sorted(states) == [0, 0, 1]


async def test_a_broker_with_one_region_shows_no_region_metrics(
    local_aws: LocalAws, template_url: str, broker_identity: Identity, tmp_path: Path
) -> None:
    """One region: broker_sts_calls says it all (and test_observability's label set holds)."""
    settings = settings_for(f"sqlite:///{tmp_path / 'broker.db'}", local_aws, template_url)
    async with start_broker(settings, broker_identity) as running:
        families = list(text_string_to_metric_families(await metrics_text(running)))
    assert "broker_sts_calls" in {family.name for family in families}
    assert not [
        f.name for f in families if f.name.startswith(("broker_sts_region", "broker_sts_f"))
    ]
    assert not [s for f in families for s in f.samples if "region" in s.labels]


# The breaker's choice, as a table: (regions as (name, open_until, trial)), what was tried,
# the time → the region picked and whether this call is its half-open trial.
PICKS = [
    ([("a", None, False), ("b", None, False)], set(), 0.0, ("a", False)),
    ([("a", 30.0, False), ("b", None, False)], set(), 10.0, ("b", False)),
    ([("a", 30.0, False), ("b", None, False)], set(), 30.0, ("a", True)),
    ([("a", 30.0, True), ("b", None, False)], set(), 31.0, ("b", False)),
    ([("a", None, False), ("b", None, False)], {"a"}, 0.0, ("b", False)),
    # every region open: still asked, soonest to close first, whatever the order
    ([("a", 40.0, False), ("b", 35.0, False)], set(), 10.0, ("b", False)),
    ([("a", 40.0, False), ("b", 35.0, False)], {"b"}, 10.0, ("a", False)),
    ([("a", None, False), ("b", 35.0, False)], {"a"}, 10.0, ("b", False)),
    ([("a", 30.0, True), ("b", 35.0, False)], set(), 31.0, ("a", False)),
    ([("a", None, False)], {"a"}, 0.0, None),
]


@pytest.mark.parametrize(("table", "tried", "now", "expected"), PICKS)
def test_which_region_a_call_tries_next(
    table: list[tuple[str, float | None, bool]],
    tried: set[str],
    now: float,
    expected: tuple[str, bool] | None,
) -> None:
    regions = [Region(name, None, open_until=until, trial=trial) for name, until, trial in table]
    picked = pick(regions, tried, now)
    assert (picked and (picked[0].name, picked[1])) == expected
    if expected is not None and expected[1]:
        assert picked is not None
        assert picked[0].trial, "the trial is taken: one call at a time"


# Settings an attacker or a typo could give: each refused, naming the variable.
REFUSED = [
    ({"sts_regions": "us-east-1,us-e\u0430st-1"}, "BROKER_STS_REGIONS"),  # a Cyrillic a
    ({"sts_regions": "us\u2010east\u20101"}, "BROKER_STS_REGIONS"),  # Unicode hyphens
    ({"sts_regions": "us-east-1.attacker.example"}, "BROKER_STS_REGIONS"),
    ({"sts_regions": "US-EAST-1"}, "BROKER_STS_REGIONS"),
    ({"sts_regions": "us-east-01"}, "BROKER_STS_REGIONS"),
    ({"sts_regions": "us-east-1,us-east-1"}, "twice"),
    ({"sts_regions": ","}, "BROKER_STS_REGIONS"),
    ({"sts_regions": "us-east-1,,us-west-2"}, "BROKER_STS_REGIONS"),
    (
        {"sts_regions": "us-east-1", "sts_endpoint_urls": "eu-west-1=https://sts.example"},
        "not in BROKER_STS_REGIONS",
    ),
    ({"sts_endpoint_urls": "us-west-2=https://sts.example"}, "not in BROKER_STS_REGIONS"),
    ({"sts_endpoint_urls": "us-east-1"}, "BROKER_STS_ENDPOINT_URLS"),
    ({"sts_endpoint_urls": "us-east-1=file:///etc/passwd"}, "BROKER_STS_ENDPOINT_URLS"),
    ({"sts_endpoint_urls": "us-east-1=https://a,us-east-1=https://b"}, "twice"),
    # Signed requests and the credentials answered never cross a network in the clear.
    ({"sts_endpoint_urls": "us-east-1=http://sts.example"}, "in the clear"),
    ({"sts_endpoint_urls": "us-east-1=http://10.0.0.7:8080"}, "in the clear"),
    ({"aws_endpoint_url": "http://moto.internal:5000"}, "in the clear"),
    ({"sts_endpoint_urls": "us-east-1=https://"}, "BROKER_STS_ENDPOINT_URLS"),
    ({"aws_region": "us-east-1 "}, "BROKER_AWS_REGION"),
    ({"aws_region": "*"}, "BROKER_AWS_REGION"),
    ({"aws_region": "us-e\u0430st-1"}, "BROKER_AWS_REGION"),
    ({"sts_region_cooldown": "0"}, "BROKER_STS_REGION_COOLDOWN"),
    ({"sts_region_cooldown": "-1"}, "BROKER_STS_REGION_COOLDOWN"),
]


@pytest.mark.parametrize(("overrides", "said"), REFUSED)
def test_a_wrong_region_setting_is_refused(overrides: dict[str, str], said: str) -> None:
    with pytest.raises(ConfigError, match=said):
        load_settings(**overrides)


def test_an_empty_region_list_means_the_broker_region_alone() -> None:
    assert load_settings(sts_regions="", aws_region="eu-west-1").regions == ("eu-west-1",)
    assert load_settings(sts_regions="  ").regions == (load_settings().aws_region,)


@pytest.mark.parametrize(
    ("regions", "said"),
    [
        ("us-east-1,xx-nowhere-1", "xx-nowhere-1 is in no AWS partition"),
        ("us-east-1,cn-north-1", "mixes AWS partitions"),
    ],
)
async def test_regions_failover_cannot_use_stop_the_start(
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    tmp_path: Path,
    regions: str,
    said: str,
) -> None:
    """Regions of no partition, or of two (credentials of one are refused in the other: the
    second region would fail exactly when it is needed), stop the broker at start-up."""
    settings = settings_for(f"sqlite:///{tmp_path / 'broker.db'}", local_aws, template_url)
    with pytest.raises(ConfigError, match=said):
        async with start_broker(settings | {"sts_regions": regions}, broker_identity):
            pass


def test_a_regional_endpoint_answers_only_requests_signed_for_its_region(
    regions: tuple[RegionalEndpoint, RegionalEndpoint], broker_identity: Identity
) -> None:
    def caller(region: str, endpoint: RegionalEndpoint) -> Any:
        return boto3.client(
            "sts",
            region_name=region,
            endpoint_url=endpoint.endpoint_url,
            aws_access_key_id=broker_identity.access_key_id,
            aws_secret_access_key=broker_identity.secret_access_key,
        ).get_caller_identity()

    assert caller(SECOND, regions[1])["Arn"] == broker_identity.arn
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        caller(FIRST, regions[1])


def test_broker_dev_serves_each_region_and_takes_one_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`broker dev` with BROKER_STS_REGIONS: an emulator endpoint per region, the broker
    pointed at them, and a region taken down over HTTP: with the first down, the whole flow
    (grpcurl, `broker dev-stack`) is issued by the second."""
    monkeypatch.setenv("BROKER_STS_REGIONS", f"{FIRST},{SECOND}")
    dev = Dev(tmp_path)
    try:
        first = dev.wait_for(rf"\n +{FIRST} +(http://\S+)")[1]
        metrics = dev.wait_for(r"metrics \(Prometheus\): +(\S+)")[1]
        down = urllib.request.Request(f"{dev.aws}/_emulator/regions/{FIRST}/down", method="POST")
        with urllib.request.urlopen(down, timeout=10) as answer:
            assert answer.read().decode() == f"{FIRST} is down\n"
        with pytest.raises(OSError, match="Connection refused"):
            urllib.request.urlopen(first, timeout=10)

        created = dev.grpcurl(f"{SERVICE}/CreateConnection", {"tenant_id": "acme"})
        link = created["connection"]["quick_create_url"]  # type: ignore[index]
        stack = run(str(BIN / "broker"), "dev-stack", link, "--aws-endpoint", dev.aws)
        assert stack.returncode == 0, stack.stderr
        role_arn = stack.stdout.strip()
        dev.grpcurl(f"{SERVICE}/VerifyRole", {"tenant_id": "acme", "role_arn": role_arn})
        dev.grpcurl(f"{SERVICE}/IssueCredentials", {"tenant_id": "acme", "run_id": "r1"})

        with urllib.request.urlopen(metrics, timeout=10) as answer:
            text = answer.read().decode()
        calls = {
            (s.labels["region"], s.labels["outcome"]): s.value
            for f in text_string_to_metric_families(text)
            if f.name == "broker_sts_region_calls"
            for s in f.samples
        }
        assert calls[(SECOND, "ok")] >= 2  # VerifyRole's AssumeRole, then the run's
        assert calls[(FIRST, "ok")] == 0
        assert calls[(FIRST, "transient")] >= 1
        assert dev.stop() == 0
    finally:
        dev.close()


def test_a_region_taken_down_refuses_a_client_that_was_using_it(
    regions: tuple[RegionalEndpoint, RegionalEndpoint], broker_identity: Identity
) -> None:
    """No connection a client holds outlives the endpoint going down: its next request is
    refused until the endpoint is back, on the same port."""
    sts = boto3.client(
        "sts",
        region_name=FIRST,
        endpoint_url=regions[0].endpoint_url,
        aws_access_key_id=broker_identity.access_key_id,
        aws_secret_access_key=broker_identity.secret_access_key,
        config=botocore.config.Config(retries={"total_max_attempts": 1}),
    )
    assert sts.get_caller_identity()["Arn"] == broker_identity.arn  # a pooled connection now
    regions[0].down()
    with pytest.raises(botocore.exceptions.ConnectionError):
        sts.get_caller_identity()
    regions[0].up()
    assert sts.get_caller_identity()["Arn"] == broker_identity.arn
