"""`make bench`'s code, run small (`python -m bench --quick`) so it cannot rot. Its timings are
not judged here (these machines are noisy); what must hold on any machine is: the run ends,
writes every section and row, every broker answer it counted was OK, and the STS figures that
follow from single flight and the concurrency bound are exact: the STS stand-in answered one
AssumeRole per run, never more at once than the bound, and a reconnect storm lost no stream;
and so are those of #14 and #15: no cached call went to STS or failed at the refresh point or
in an STS outage, with one region down no new run failed, and the default limits' storm lost
no stream."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

from bench import fakests

ROOT = Path(__file__).resolve().parent.parent
STREAM_ROWS = [  # of the quick run's 100 streams
    "all opened with credentials",
    "opened per second (one AssumeRole each)",
    "AssumeRole answered while opening",
    "most AssumeRole in flight while opening",
    "memory per stream",
    "renewal round, first to last",
    "renewed after (min / median / max)",
    "AssumeRole answered in the renewal round",
    "most AssumeRole in flight in the renewal round",
    "renewed only after their credentials expired",
    "streams that ended",
]
STORM_ROWS = [  # of the quick run's 300 streams
    "all back with credentials after A was killed",
    "failed on A while they opened, before the kill",
    "never back",
    "ended CANCELLED",
    "reopened streams that failed again",
    "AssumeRole answered during the storm",
    "most AssumeRole in flight",
]
# Nobody waits on STS (quick: 2 runs per window, 10 + 1 new runs in the region rows).
LATENCY_ROWS = ["p50", "p99", "p99 beside control runs, same window", "slowest call"]
REFRESH_ROWS = [
    *(f"cached call while the renewal is in flight: {row}" for row in LATENCY_ROWS),
    "cached call while the renewal is in flight: calls failed",
    "cached call while the renewal is in flight: calls that went to STS",
    "background renewals started",
    "AssumeRole calls for the renewal",
]
ADVISORY_ROWS = [*LATENCY_ROWS, "calls failed", "calls that went to STS"]
OUTAGE_ROWS = [
    *(f"ServiceUnavailable, advisory window: {row}" for row in ADVISORY_ROWS),
    "ServiceUnavailable, mandatory window: p50",
    "ServiceUnavailable, mandatory window: slowest call (one that waited for an STS attempt)",
    "ServiceUnavailable, mandatory window: calls that waited on STS",
    "ServiceUnavailable, mandatory window: calls failed",
    *(f"hanging, advisory window: {row}" for row in ADVISORY_ROWS),
    "hanging, advisory window: renewals left hanging at the stand-in",
]
REGION_ROWS = [
    "first new run after us-east-1 went down (pays the failover)",
    "new runs once the breaker is open: median",
    "new runs once the breaker is open: p99",
    "new runs failed with us-east-1 down",
    "calls moved on from us-east-1 (failovers)",
    "AssumeRole answered by us-west-2",
]
QUOTA_ROWS = [
    "default limits, c=16: throughput",
    "default limits, c=16: p99",
    "default limits, c=16: CPU per call",
    "a miss (new run): broker CPU, default limits",
    "one new-session check, admitted",
    "one new-session check, refused (RESOURCE_EXHAUSTED built)",
]
LIMITED_STORM_ROWS = [  # of the quick run's 600 streams
    "limits out of the way: all back with credentials after A was killed",
    "default limits: all back with credentials after A was killed",
    "default limits: never back",
    "default limits: ended CANCELLED",
    "default limits: reopened streams refused RESOURCE_EXHAUSTED (each retried)",
    "default limits: AssumeRole answered during the storm",
    "default limits: most AssumeRole in flight",
]
SECTIONS = {
    "Hot path: IssueCredentials from the cache",
    "Fair share: the quota check's cost",
    "Nobody waits on STS: the refresh point",
    "Nobody waits on STS: an STS outage",
    "Nobody waits on STS: one STS region down",
    "Fair share: a reconnect storm under the default limits",
    "STS economy",
    "Cold path: cache misses, STS answering after 50 ms",
    "Streams: WatchCredentials on one broker",
    "Reconnect storm: every stream moves to another broker at once",
    "Start-up",
    "Memory of the credential cache",
}


def test_the_benchmark_runs_and_reports_every_figure(tmp_path: Path) -> None:
    if shutil.which("h2load") is None:
        message = "h2load is missing (bash scripts/h2load.sh installs nghttp2-client)"
        if os.environ.get("BROKER_TEST_REQUIRE_H2LOAD") == "1":
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    figures = json.loads((tmp_path / "benchmarks.json").read_text())["figures"]
    assert {f["section"] for f in figures} == SECTIONS
    named = {f["what"]: f for f in figures}
    hot = [f for f in figures if f["section"].startswith("Hot path")]
    assert all(f["baseline"] and f["value"] > 0 for f in hot), "each beside its bare ceiling"

    # Single flight: one AssumeRole per run, however many callers asked at once.
    assert named["AssumeRole calls"]["value"] == named["AssumeRole calls"]["baseline"]
    assert named["most AssumeRole calls for one run"]["value"] == 1
    # Every row of the sections on the STS stand-in, in order.
    assert _rows(figures, "Streams") == [f"100 streams: {row}" for row in STREAM_ROWS]
    assert _rows(figures, "Reconnect storm") == [f"300 streams: {row}" for row in STORM_ROWS]
    cold = _rows(figures, "Cold path")
    assert cold[0] == "one miss, median"
    assert cold[1:] == [
        f"{n} new runs at once: {row}"
        for n in (1, 20)
        for row in (
            "all answered",
            "AssumeRole answered by the stand-in",
            "most AssumeRole in flight",
        )
    ]
    # The stand-in answered exactly one AssumeRole per run: per burst, per stream opened, per
    # stream renewed, per stream reopened in the storm.
    # And one per run on the second region with the first down, and in the storm under the
    # default limits.
    answered = [f for f in figures if "AssumeRole answered" in f["what"]]
    assert len(answered) == 7
    assert all(f["value"] == f["baseline"] and f["met"] for f in answered), answered
    assert [f["value"] for f in answered] == [1, 20, 11, 100, 100, 300, 600]
    # The STS concurrency bound held in every burst, opening, renewal round and storm; under
    # the default limits, the tenant's share of it (a quarter).
    bounded = [f for f in figures if "most AssumeRole in flight" in f["what"]]
    assert len(bounded) == 6
    assert all(0 < f["value"] <= f["baseline"] for f in bounded), bounded
    assert [f["baseline"] for f in bounded] == [32] * 5 + [8]
    assert named["100 streams: streams that ended"]["value"] == 0
    # The storm: every stream back on the other broker, none dropped by gRPC core.
    assert named["300 streams: never back"]["value"] == 0
    assert named["300 streams: ended CANCELLED"]["value"] == 0
    assert named["300 streams: reopened streams that failed again"]["value"] == 0
    assert named["300 streams: ended CANCELLED"]["note"] == "0 runs hit; A's kill: UNAVAILABLE 300"

    _nobody_waits_on_sts(figures)
    _fair_share(figures)

    table = (tmp_path / "benchmarks.md").read_text()
    assert "| broker (uvloop), c=16: throughput |" in table
    assert "| 1,000 cached runs: RSS (" in table


def _nobody_waits_on_sts(figures: list[dict[str, Any]]) -> None:
    """At the advisory point and in an outage (errors, or a hang), no cached call went to STS
    or failed, and each run was renewed once; with one region down no new run failed and only
    the first call moved on."""
    named = {f["what"]: f for f in figures if f["section"].startswith("Nobody waits on STS")}
    assert _rows(figures, "Nobody waits on STS: the refresh point") == REFRESH_ROWS
    assert _rows(figures, "Nobody waits on STS: an STS outage") == OUTAGE_ROWS
    assert _rows(figures, "Nobody waits on STS: one STS region down") == REGION_ROWS
    for latency in (f for f in named.values() if f["unit"] == "ms"):
        assert latency["value"] > 0, latency
        assert latency["baseline"] > 0, latency
    for none in (
        "cached call while the renewal is in flight: calls failed",
        "cached call while the renewal is in flight: calls that went to STS",
        "ServiceUnavailable, advisory window: calls failed",
        "ServiceUnavailable, advisory window: calls that went to STS",
        "hanging, advisory window: calls failed",
        "hanging, advisory window: calls that went to STS",
        "new runs failed with us-east-1 down",
    ):
        assert named[none]["value"] == 0, named[none]
        assert named[none]["met"], named[none]
    for one_per_run in (
        "background renewals started",
        "AssumeRole calls for the renewal",
        "hanging, advisory window: renewals left hanging at the stand-in",
    ):
        assert named[one_per_run]["value"] == named[one_per_run]["baseline"] == 2
    assert named["calls moved on from us-east-1 (failovers)"]["value"] == 1


def _fair_share(figures: list[dict[str, Any]]) -> None:
    """The quota check measured beside a miss; the storm under the default limits lost no
    stream and was refused new sessions past the tenant's burst (500)."""
    assert _rows(figures, "Fair share: the quota check's cost") == QUOTA_ROWS
    cost = [f for f in figures if f["section"] == "Fair share: the quota check's cost"]
    assert all(f["value"] > 0 and f["baseline"] > 0 for f in cost), cost
    storm = _rows(figures, "Fair share: a reconnect storm")
    assert storm == [f"600 streams, {row}" for row in LIMITED_STORM_ROWS]
    named = {f["what"]: f for f in figures}
    assert named["600 streams, default limits: never back"]["value"] == 0
    assert named["600 streams, default limits: ended CANCELLED"]["value"] == 0
    refused = named[
        "600 streams, default limits: reopened streams refused RESOURCE_EXHAUSTED (each retried)"
    ]
    assert refused["value"] > 0
    assert refused["note"].endswith("; 0 other failures")


def test_the_sts_stand_in_answers_as_sts_does(tmp_path: Path) -> None:
    """What the benchmark's brokers get from the stand-in, read by botocore: credentials of
    real form and size for the session asked, expiring when asked; the caller's identity; an
    STS error when told to fail; and the count of each."""
    with fakests.running(tmp_path / "sts.log", core=None, latency=0.001) as sts:
        client = boto3.client(
            "sts",
            region_name="us-east-1",
            endpoint_url=sts.url,
            aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
            aws_secret_access_key="not-checked",
            config=Config(retries={"total_max_attempts": 1}),
        )
        ask = {
            "RoleArn": "arn:aws:iam::222222222222:role/path/Reader",
            "RoleSessionName": "run-7",
            "DurationSeconds": 900,
            "ExternalId": "e" * 32,
            "SourceIdentity": "acme",
            "PolicyArns": [{"arn": "arn:aws:iam::aws:policy/ReadOnlyAccess"}],
            "Tags": [{"Key": "tenant", "Value": "acme"}],
        }
        answer = client.assume_role(**ask)
        issued = answer["Credentials"]
        assert re.fullmatch(r"ASIA[A-Z2-7]{16}", issued["AccessKeyId"])
        assert len(issued["SecretAccessKey"]) == 40
        assert len(issued["SessionToken"]) == fakests.SESSION_TOKEN_CHARS
        assert 0 < (issued["Expiration"] - datetime.now(UTC)).total_seconds() <= 900
        assert answer["AssumedRoleUser"]["Arn"] == (
            "arn:aws:sts::222222222222:assumed-role/Reader/run-7"
        )
        assert answer["AssumedRoleUser"]["AssumedRoleId"].endswith(":run-7")
        assert answer["SourceIdentity"] == "acme"
        assert client.assume_role(**ask)["Credentials"]["AccessKeyId"] != issued["AccessKeyId"]
        assert client.get_caller_identity()["Arn"] == fakests.CALLER_ARN

        sts.configure(error="Throttling")
        with pytest.raises(ClientError) as refused:
            client.assume_role(**ask)
        assert refused.value.response["Error"]["Code"] == "Throttling"
        stats = sts.stats()
        assert (stats["AssumeRole"], stats["GetCallerIdentity"], stats["errors"]) == (2, 1, 1)
        assert (stats["in_flight"], stats["most_in_flight"]) == (0, 1)
        sts.reset()
        assert sts.stats()["AssumeRole"] == 0

        sts.kill()  # a region going down: its endpoint refuses connections
        with pytest.raises(EndpointConnectionError):
            client.get_caller_identity()


def test_another_revision_is_measured_beside_this_one() -> None:
    if shutil.which("h2load") is None or not (ROOT / ".git").exists():
        pytest.skip("needs h2load and a git checkout")
    worktrees = _worktrees()
    done = subprocess.run(
        [sys.executable, "-m", "bench.versus", "HEAD", "--rounds=1", "--seconds=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for concurrency in ("c=1", "c=16", "c=64"):
        assert concurrency in done.stdout
    assert done.stdout.count("HEAD:") == 3
    assert done.stdout.count("this checkout:") == 3
    assert _worktrees() == worktrees, "the temporary checkout is removed"


def _rows(figures: list[dict[str, Any]], section: str) -> list[str]:
    return [f["what"] for f in figures if f["section"].startswith(section)]


def _worktrees() -> list[str]:
    listed = subprocess.run(
        ["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return listed.stdout.splitlines()
