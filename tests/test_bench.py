"""`make bench`'s code, run small (`python -m bench --quick`) so it cannot rot. Its timings are
not judged here (these machines are noisy); what must hold on any machine is: the run ends,
writes every section, every broker answer it counted was OK, and the STS figures that follow
from single flight and the concurrency bound are exact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {
    "Hot path: IssueCredentials from the cache",
    "STS economy",
    "Cold path: cache misses, STS answering after 50 ms",
    "Streams: WatchCredentials on one broker",
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
        timeout=170,
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
    # The STS concurrency bound held in every burst and renewal round.
    bounded = [f for f in figures if "most AssumeRole in flight" in f["what"]]
    assert len(bounded) == 3
    assert all(f["value"] <= f["baseline"] for f in bounded)
    assert named["100 streams: streams that ended"]["value"] == 0

    table = (tmp_path / "benchmarks.md").read_text()
    assert "| broker (uvloop), c=16: throughput |" in table
    assert "| 1,000 cached runs: RSS (" in table


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


def _worktrees() -> list[str]:
    listed = subprocess.run(
        ["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return listed.stdout.splitlines()
