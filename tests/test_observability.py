"""What the on-call engineer and the security reviewer see: metrics scraped over HTTP, one JSON
log line per RPC, and the audit trail (stored events and audit log lines), none holding a secret."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.emulator import Identity, LocalAws
from broker.logs import BatchingStreamHandler, JsonFormatter
from broker.v1 import broker_pb2 as pb
from tests.conftest import (
    Running,
    captured_logs,
    connect,
    metrics_text,
    settings_for,
    start_broker,
)
from tests.faults import FaultyAws

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(running: Running) -> Samples:
    text = await metrics_text(running)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    with captured_logs(JsonFormatter(), logging.INFO) as sink:
        yield sink


async def test_metrics_follow_the_flow(running: Running, local_aws: LocalAws, tenant: str) -> None:
    before = await scrape(running)
    stub = running.stub
    created = await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    role_arn = local_aws.create_customer_stack(created.connection.quick_create_url)
    await stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))
    for _ in range(3):
        await stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r"))
    stream = stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="w"))
    await stream.read()
    during = await scrape(running)
    await stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
    with pytest.raises(grpc.aio.AioRpcError):
        await stream.read()
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r"))
    await asyncio.sleep(0.1)
    after = await scrape(running)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("broker_rpcs_total", method="IssueCredentials", code="OK") == 3
    assert grew("broker_rpcs_total", method="IssueCredentials", code="FAILED_PRECONDITION") == 1
    assert grew("broker_rpcs_total", method="WatchCredentials", code="FAILED_PRECONDITION") == 1
    assert grew("broker_rpcs_total", method="VerifyRole", code="OK") == 1
    assert grew("broker_rpc_duration_seconds_count", method="IssueCredentials") == 4
    assert grew("broker_cache_hits_total") == 2
    assert grew("broker_cache_misses_total") == 2  # run r once, stream w once
    assert grew("broker_sts_calls_total", outcome="ok") == 3  # + the verification's probe
    # VerifyRole's probes without an external ID and with a random other one.
    assert grew("broker_sts_calls_total", outcome="denied") == 2
    assert value(during, "broker_streams_active") == 1
    assert value(after, "broker_streams_active") == 0
    assert value(during, "broker_cache_entries") >= 2
    assert value(after, "broker_connections", status="DISCONNECTED") >= 1
    labels = {label for (_, pairs) in after for label, _ in pairs}
    bounded = {"method", "code", "outcome", "status", "loop", "limit", "le"}
    assert labels <= bounded, "bounded labels only"


async def test_every_rpc_is_one_json_log_line(
    running: Running, local_aws: LocalAws, tenant: str, json_log: io.StringIO
) -> None:
    stub = running.stub
    created = await stub.CreateConnection(
        pb.CreateConnectionRequest(tenant_id=tenant), metadata=(("x-request-id", "req-42"),)
    )
    role_arn = local_aws.create_customer_stack(created.connection.quick_create_url)
    await stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))
    await stub.GetConnection(pb.GetConnectionRequest(tenant_id=tenant))
    await stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r"))
    await stub.ReleaseCredentials(pb.ReleaseCredentialsRequest(tenant_id=tenant, run_id="r"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetConnection(pb.GetConnectionRequest(tenant_id="-bad-"))
    await stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
    await stub.ListConnectionEvents(pb.ListConnectionEventsRequest(tenant_id=tenant))

    entries = [json.loads(line) for line in json_log.getvalue().splitlines()]
    rpcs = [e for e in entries if e["logger"] == "broker.service"]
    assert [(e["method"], e["code"]) for e in rpcs] == [
        ("CreateConnection", "OK"),
        ("VerifyRole", "OK"),
        ("GetConnection", "OK"),
        ("IssueCredentials", "OK"),
        ("ReleaseCredentials", "OK"),
        ("GetConnection", "INVALID_ARGUMENT"),
        ("Disconnect", "OK"),
        ("ListConnectionEvents", "OK"),
    ]
    for entry in rpcs:
        assert {
            "time",
            "level",
            "method",
            "code",
            "tenant",
            "run",
            "caller",
            "latency_ms",
            "request_id",
        } <= set(entry)
        assert entry["caller"] == "anonymous@loopback"
    assert rpcs[0]["request_id"] == "req-42", "the caller's request id is kept"
    assert len({e["request_id"] for e in rpcs}) == len(rpcs)


async def test_audit_trail_is_complete_and_holds_no_secret(
    running: Running, local_aws: LocalAws, tenant: str, json_log: io.StringIO
) -> None:
    stub = running.stub
    created = await stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.VerifyRole(
            pb.VerifyRoleRequest(tenant_id=tenant, role_arn="arn:aws:iam::222222222222:role/nope")
        )
    role_arn = local_aws.create_customer_stack(created.connection.quick_create_url)
    await stub.VerifyRole(pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn))
    issued = (
        await stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run-7"))
    ).credentials
    await stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))

    events = (
        await stub.ListConnectionEvents(pb.ListConnectionEventsRequest(tenant_id=tenant))
    ).events
    assert [e.kind for e in events] == [
        "disconnected",
        "verified",
        "verification_failed",
        "created",
    ]
    assert all(e.actor == "anonymous@loopback" for e in events)
    assert all(e.external_id == created.connection.external_id for e in events)
    assert events[2].role_arn.endswith("role/nope")
    assert not all(c.passed for c in events[2].checks)
    assert all(c.passed for c in events[1].checks)
    assert events[1].role_arn == role_arn
    newest = await stub.ListConnectionEvents(
        pb.ListConnectionEventsRequest(tenant_id=tenant, page_size=1)
    )
    assert [e.kind for e in newest.events] == ["disconnected"]

    audit = [
        json.loads(line)
        for line in json_log.getvalue().splitlines()
        if json.loads(line)["logger"] == "broker.audit"
    ]
    issuance = [a for a in audit if a["audit"] == "credentials_issued" and a.get("run") == "run-7"]
    assert len(issuance) == 1
    assert issuance[0]["access_key_id"] == issued.access_key_id
    assert issuance[0]["source_identity"] == "run-7"
    assert issuance[0]["role_arn"] == role_arn
    assert issuance[0]["actor"] == "anonymous@loopback"
    assert issuance[0]["expiration"].startswith(issued.expiration.ToDatetime().isoformat()[:19])
    assert {a["audit"] for a in audit} >= {
        "created",
        "verification_failed",
        "verified",
        "disconnected",
    }
    everything = json_log.getvalue()
    assert issued.secret_access_key not in everything
    assert issued.session_token not in everything


async def test_rpc_log_errors_logs_only_the_calls_that_failed(
    broker_settings: dict[str, Any],
    broker_identity: Identity,
    local_aws: LocalAws,
    tenant: str,
    json_log: io.StringIO,
) -> None:
    async with start_broker(broker_settings | {"rpc_log": "errors"}, broker_identity) as running:
        await connect(running, local_aws, tenant)
        await running.stub.IssueCredentials(
            pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r")
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.GetConnection(pb.GetConnectionRequest(tenant_id="nobody"))
        counted = await scrape(running)
    entries = [json.loads(line) for line in json_log.getvalue().splitlines()]
    rpcs = [(e["method"], e["code"]) for e in entries if e["logger"] == "broker.service"]
    assert rpcs == [("GetConnection", "NOT_FOUND")]
    assert [e["audit"] for e in entries if e["logger"] == "broker.audit"] == [
        "created",
        "verified",
        "credentials_issued",
    ], "audit events are logged whatever BROKER_RPC_LOG says"
    assert value(counted, "broker_rpcs_total", method="IssueCredentials", code="OK") == 1


def test_log_lines_are_written_in_batches_and_warnings_at_once() -> None:
    sink = io.StringIO()
    handler = BatchingStreamHandler(sink, interval=0.2)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.batching")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info("first")
        logger.warning("second")  # written at once, after what waited before it
        assert [json.loads(line)["message"] for line in sink.getvalue().splitlines()] == [
            "first",
            "second",
        ]
        logger.info("third")
        deadline = time.monotonic() + 5
        while "third" not in sink.getvalue():
            assert time.monotonic() < deadline, "an INFO line waits an interval at most"
            time.sleep(0.05)
    finally:
        logger.removeHandler(handler)
        handler.close()


def enumerated(text: str) -> dict[str, tuple[str, set[str]]]:
    """Family → (label, the values its HELP names), for every HELP of the form
    `… by LABEL: value (what it counts); value (…); ….`"""
    named = {}
    for family in text_string_to_metric_families(text):
        found = re.search(r"\bby (\w+): (.*)\.$", family.documentation)
        if found:
            label, values = found.groups()
            named[family.name] = (label, set(re.findall(r"(?:^|; )(\w+) \(", values)))
    return named


async def test_the_help_names_exactly_the_label_values_that_occur(
    local_aws: LocalAws, broker_identity: Identity, template_url: str, tmp_path: Path, tenant: str
) -> None:
    """A flow that makes every STS outcome happen (through a fault-injecting proxy) and renews
    a stream, then a scrape: each counter whose label is an outcome or a loop has a HELP text
    naming its values, every value seen is named, and every value named was seen (or, for
    failures of background loops, shows at 0). No `_created` series."""
    faults = FaultyAws(local_aws.endpoint_url).start()
    settings = settings_for(f"sqlite:///{tmp_path / 'broker.db'}", local_aws, template_url)
    try:
        async with start_broker(
            settings | {"aws_endpoint_url": faults.endpoint_url}, broker_identity
        ) as running:
            stub = running.stub
            await connect(running, local_aws, tenant)  # ok, and denied twice (the probes)
            await stub.IssueCredentials(pb.IssueCredentialsRequest(tenant_id=tenant, run_id="r"))

            faults.inject("throttle", count=3)  # every attempt botocore makes: transient
            with pytest.raises(grpc.aio.AioRpcError) as throttled:
                await stub.IssueCredentials(
                    pb.IssueCredentialsRequest(tenant_id=tenant, run_id="throttled")
                )
            assert throttled.value.code() == grpc.StatusCode.UNAVAILABLE

            faults.inject("latency", seconds=2.0)  # the caller gives up first: abandoned
            with pytest.raises(grpc.aio.AioRpcError) as gave_up:
                await stub.IssueCredentials(
                    pb.IssueCredentialsRequest(tenant_id=tenant, run_id="slow"), timeout=0.3
                )
            assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            faults.clear()

            local_aws.sts.session_lifetime = 4  # renewed at half-life: a renewal within 2 s
            stream = stub.WatchCredentials(
                pb.WatchCredentialsRequest(tenant_id=tenant, run_id="watched")
            )
            first = await asyncio.wait_for(stream.read(), 10)
            renewed = await asyncio.wait_for(stream.read(), 10)
            assert renewed.credentials.access_key_id != first.credentials.access_key_id
            stream.cancel()

            deadline = time.monotonic() + 5
            while 'outcome="abandoned"} 1.0' not in (text := await metrics_text(running)):
                assert time.monotonic() < deadline, text
                await asyncio.sleep(0.1)
    finally:
        faults.stop()

    assert "_created" not in text
    named = enumerated(text)
    seen: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                values = seen.setdefault(family.name, {}).setdefault(label, set())
                if sample.value > 0:
                    values.add(label_value)
    open_labels = {"method", "code", "status", "le"}  # any RPC, any status: not enumerated
    for family, labels in seen.items():
        for label in set(labels) - open_labels:
            assert family in named, f"{family}'s HELP does not name its {label} values"
            assert named[family][0] == label, family
            assert labels[label] <= named[family][1], (family, labels[label], named[family])
    assert named["broker_sts_calls"] == ("outcome", {"ok", "denied", "transient", "abandoned"})
    assert seen["broker_sts_calls"]["outcome"] == named["broker_sts_calls"][1]
    assert named["broker_stream_renewals"] == ("outcome", {"ok"})
    assert seen["broker_stream_renewals"]["outcome"] == {"ok"}
    loops = {
        s.labels["loop"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if f.name == "broker_background_errors"
    }
    assert loops == named["broker_background_errors"][1], "every loop shows, at 0"
