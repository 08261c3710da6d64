"""The access record (logs.AccessLog): while the broker's own handler is the only one, the line
of each plain call is written without a LogRecord, and it is the line `logging` writes
otherwise; anything a caller sent that is not plain still goes through `logging`, bounded and
escaped. And the RPC metrics' direct tally counts as prometheus_client's own API does."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from broker import service
from broker.emulator import Identity, LocalAws
from broker.logs import AccessLog, BatchingStreamHandler, JsonFormatter
from broker.metrics import LATENCY_BUCKETS, _tally
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running, connect, settings_for, start_broker
from tests.test_log_abuse import CALLS, REQUEST_ID, RPCS, check_bounded, hostile_call

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00")
# Both broker_handler and the records' count see the logger that writes every RPC's line.
RPC_LOGGER = "broker.service"


@contextlib.contextmanager
def broker_handler() -> Iterator[io.StringIO]:
    """The root logger as `logs.configure` leaves it in the JSON format, its stream a
    StringIO, for the test's duration (pytest's own handlers set aside meanwhile)."""
    sink = io.StringIO()
    handler = BatchingStreamHandler(sink, interval=3600)  # written at close, or by a warning
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield sink
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
        handler.close()


@pytest.fixture
def rpc_records(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The messages of the LogRecords made for `broker.service`, as they are made."""
    made: list[str] = []
    original = logging.Logger.makeRecord

    def counting(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = original(self, *args, **kwargs)
        if record.name == RPC_LOGGER:
            made.append(record.getMessage())
        return record

    monkeypatch.setattr(logging.Logger, "makeRecord", counting)
    return made


async def three_calls(running: Running, tenant: str) -> None:
    """A cached IssueCredentials, one that fails (FAILED_PRECONDITION: an unknown run of a
    tenant that is not there), and a GetConnection: each with a request id of its own."""
    await running.stub.IssueCredentials(
        pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run:7/a=b+c@d"),
        metadata=(("x-request-id", "req-1"),),
    )
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await running.stub.IssueCredentials(
            pb.IssueCredentialsRequest(tenant_id="nobody-here", run_id="r"),
            metadata=(("x-request-id", "req-2"),),
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    await running.stub.GetConnection(
        pb.GetConnectionRequest(tenant_id=tenant), metadata=(("x-request-id", "req-3"),)
    )


def rpc_lines(log: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in log.splitlines()]
    return [e for e in entries if e["logger"] == RPC_LOGGER]


async def test_the_access_record_is_the_line_logging_writes(
    local_aws: LocalAws,
    template_url: str,
    broker_identity: Identity,
    tmp_path: Path,
    tenant: str,
    rpc_records: list[str],
) -> None:
    settings = settings_for(f"sqlite:///{tmp_path / 'broker.db'}", local_aws, template_url)
    async with start_broker(settings, broker_identity) as running:
        await connect(running, local_aws, tenant)
        await running.stub.IssueCredentials(
            pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run:7/a=b+c@d")
        )
        with broker_handler() as direct:
            made_before = len(rpc_records)
            await three_calls(running, tenant)
            assert len(rpc_records) == made_before, "no LogRecord: the access record"
        # Another handler beside the broker's (as an embedding program or pytest adds one):
        # the same calls go through logging, and both handlers get their lines.
        beside = io.StringIO()
        with broker_handler() as through_logging:
            other = logging.StreamHandler(beside)
            other.setFormatter(JsonFormatter())
            logging.getLogger().addHandler(other)
            made_before = len(rpc_records)
            await three_calls(running, tenant)
            logging.getLogger().removeHandler(other)
            assert rpc_records[made_before:] == ["rpc"] * 3
    fast, slow = rpc_lines(direct.getvalue()), rpc_lines(through_logging.getvalue())
    assert rpc_lines(beside.getvalue()) == slow
    assert [(e["method"], e["code"]) for e in fast] == [
        ("IssueCredentials", "OK"),
        ("IssueCredentials", "NOT_FOUND"),
        ("GetConnection", "OK"),
    ]
    for ours, theirs in zip(fast, slow, strict=True):
        assert list(ours) == list(theirs), "the same fields, in the same order"
        assert TIME.fullmatch(ours["time"])
        assert isinstance(ours["latency_ms"], float)
        assert round(ours["latency_ms"], 2) == ours["latency_ms"]
        for entry in (ours, theirs):
            del entry["time"], entry["latency_ms"]
        assert ours == theirs
    assert fast[0]["run"] == "run:7/a=b+c@d"
    assert fast[0]["caller"] == "anonymous@loopback"
    assert [e["request_id"] for e in fast] == ["req-1", "req-2", "req-3"]


async def test_what_is_not_plain_goes_through_logging_bounded(
    guarded: tuple[Running, str], rpc_records: list[str]
) -> None:
    """Against the broker's own handler alone: a caller's hostile fields and request id are
    logged through `logging` (a record each), bounded and escaped, as test_log_abuse checks
    them; a call that fails with every field plain is an access record."""
    running, token = guarded
    metadata = (("authorization", f"Bearer {token}"), ("x-request-id", REQUEST_ID))
    with broker_handler() as sink:
        for i in range(CALLS):
            code = await hostile_call(running.stub, RPCS[i % len(RPCS)], metadata)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert rpc_records == ["rpc"] * CALLS
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await running.stub.GetConnection(
                pb.GetConnectionRequest(tenant_id="acme"), metadata=metadata[:1]
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert rpc_records == ["rpc"] * CALLS, "plain: no record"
    *hostile, plain = sink.getvalue().splitlines(keepends=True)
    for line in check_bounded("".join(hostile), "json", "INVALID_ARGUMENT"):
        assert '"caller": "token:ops"' in line
    entry = json.loads(plain)
    assert (entry["method"], entry["code"], entry["tenant"], entry["caller"]) == (
        "GetConnection",
        "NOT_FOUND",
        "acme",
        "token:ops",
    )


def test_access_lines_keep_their_place_and_leave_with_a_warning_or_at_close() -> None:
    logger = logging.getLogger("tests.access")
    access = AccessLog(logger, "rpc")

    def write(run: str) -> bool:
        return access.write("M", "OK", "t", run, 0.001234, "req", "anonymous@loopback")

    with broker_handler() as sink:
        assert write("1")
        logger.info("between")
        assert write("2")
        assert sink.getvalue() == "", "INFO waits for the batch"
        logger.warning("now")
        lines = [json.loads(line) for line in sink.getvalue().splitlines()]
        assert [(e["message"], e.get("run")) for e in lines] == [
            ("rpc", "1"),
            ("between", None),
            ("rpc", "2"),
            ("now", None),
        ]
        assert lines[0] == {
            "time": lines[0]["time"],
            "level": "INFO",
            "logger": "tests.access",
            "message": "rpc",
            "method": "M",
            "code": "OK",
            "tenant": "t",
            "run": "1",
            "latency_ms": 1.23,
            "request_id": "req",
            "caller": "anonymous@loopback",
        }
        assert TIME.fullmatch(lines[0]["time"])
        assert write("3")
        logger.setLevel(logging.WARNING)
        try:
            assert not write("4"), "INFO is off: nothing to write"
        finally:
            logger.setLevel(logging.NOTSET)
        logger.addFilter(lambda record: True)
        assert not write("5"), "a filter: through logging"
        logger.filters.clear()
        assert '"run": "3"' not in sink.getvalue()
    assert json.loads(sink.getvalue().splitlines()[-1])["run"] == "3", "written at close"
    assert not write("6"), "pytest's handlers are back: through logging"


@pytest.mark.parametrize(
    ("identity", "plain"),
    [
        ("anonymous@loopback", True),
        ("token:launcher-1.a_b", True),
        ("spiffe://example.org/ns/ci/sa/launcher", True),
        ("dns:ops.internal", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ('spiffe://example.org/a"b', False),
        ("spiffe://example.org/a\\b", False),
        ("has space", False),
        ("caf\u00e9", False),
        ("del\x7f", False),
        ("", False),
    ],
)
def test_a_caller_is_written_as_it_is_only_when_plain(identity: str, plain: bool) -> None:
    assert service._plain(identity) is plain


def test_the_direct_tally_counts_as_inc_and_observe_do() -> None:
    """The same observations, on each side of every bucket's bound, give the same samples."""
    seconds = [0.0, 0.0001, *LATENCY_BUCKETS, *(b * 1.0001 for b in LATENCY_BUCKETS), 99.0]
    samples = []
    for direct in (True, False):
        registry = CollectorRegistry()
        count = Counter("rpcs", "RPCs", ["method", "code"], registry=registry)
        latency = Histogram(
            "rpc_seconds", "latency", ["method"], buckets=LATENCY_BUCKETS, registry=registry
        )
        count_child, latency_child = count.labels("M", "OK"), latency.labels("M")
        tally = _tally(count_child, latency_child)
        for value in seconds:
            if direct:
                tally(value)
            else:
                count_child.inc()
                latency_child.observe(value)
        samples.append(
            [(s.name, s.labels, s.value) for family in registry.collect() for s in family.samples]
        )
    assert samples[0] == samples[1]
    assert ("rpcs_total", {"method": "M", "code": "OK"}, float(len(seconds))) in samples[0]
