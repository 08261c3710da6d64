"""Start-up: process start to health SERVING, for the broker and for the bare handler."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from bench.procs import BIN
from bench.report import Figure, Report
from bench.world import World, free_port, wait_serving


def _to_serving(command: list[str], env: dict[str, str] | None, port: int) -> float:
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_serving(f"127.0.0.1:{port}")
        return time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=30)


async def run(world: World, report: Report, *, quick: bool) -> None:
    section = "Start-up"
    response = world.folder / "empty.response"
    response.write_bytes(b"")
    samples = 1 if quick else 3
    broker, bare = [], []
    for _ in range(samples):
        port = free_port()
        env = world.broker_env(listen=f"127.0.0.1:{port}")
        broker.append(_to_serving([str(BIN / "broker"), "serve"], env, port))
        port = free_port()
        bare.append(
            _to_serving(
                [sys.executable, "-m", "bench.bare", str(response), f"--port={port}"], None, port
            )
        )
    report.note(
        section,
        f"From starting the process to grpc.health.v1 answering SERVING (median of {samples}); "
        "the broker migrates its SQLite store and learns nothing from AWS (its principal is "
        "configured). The baseline is the bare handler's process.",
    )
    ms = 1000 * statistics.median(broker)
    report.add(
        Figure(
            section,
            "broker serve → SERVING",
            ms,
            "ms",
            1000 * statistics.median(bare),
            "bare handler → SERVING",
        )
    )


def cache_memory(report: Report, *, quick: bool) -> None:
    section = "Memory of the credential cache"
    report.note(
        section,
        "A fresh process caches N runs (credentials made in-process at real sizes: 1,000-"
        "character session tokens); RSS after minus before. Baseline: the bytes of the "
        "credentials' own strings.",
    )
    for n in (1000,) if quick else (10_000, 100_000):
        done = subprocess.run(
            [sys.executable, "-m", "bench.cachemem", str(n)],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        result = json.loads(done.stdout)
        report.add(
            Figure(
                section,
                f"{n:,} cached runs: RSS",
                result["rss_bytes"] / 2**20,
                "MiB",
                result["payload_bytes"] / 2**20,
                "the credentials' strings",
                note=f"{result['rss_bytes'] / n / 1024:.1f} KiB per run",
            )
        )
