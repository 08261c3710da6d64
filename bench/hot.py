"""The hot path: IssueCredentials answered from the cache, against a bare grpc.aio handler that
returns the same bytes (the ceiling of this stack), both loaded by h2load from another process
with pre-encoded gRPC frames over h2c."""

from __future__ import annotations

import contextlib
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Process, cpu_seconds, pinned
from bench.report import Figure, Report
from bench.world import SERVER_CORE, RunningBroker, World, connect, stub_for
from broker.v1 import broker_pb2 as pb

LOAD_CORE = 0
METHOD = "/broker.v1.CredentialBroker/IssueCredentials"


@dataclass
class Load:
    """What one h2load run measured."""

    concurrency: int
    succeeded: int
    failed: int
    rps: float
    p50_ms: float
    p99_ms: float


def grpc_frame(message: pb.IssueCredentialsRequest) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, 4-byte length, the bytes."""
    body = message.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def h2load_binary() -> str:
    found = shutil.which("h2load")
    if found is None:
        raise RuntimeError("h2load is missing: apt-get install nghttp2-client (make bench does)")
    return found


def h2load(
    port: int, frame: Path, concurrency: int, duration: float, warm_up: float, log: Path
) -> Load:
    """One connection with `concurrency` streams in flight, for `duration` seconds."""
    command = [
        h2load_binary(),
        "--clients=1",
        f"--max-concurrent-streams={concurrency}",
        f"--duration={duration}",
        f"--warm-up-time={warm_up}",
        f"--data={frame}",
        "--header=content-type: application/grpc",
        "--header=te: trailers",
        f"--log-file={log}",
        f"http://127.0.0.1:{port}{METHOD}",
    ]
    done = subprocess.run(
        pinned(command, LOAD_CORE),
        capture_output=True,
        text=True,
        timeout=duration + warm_up + 60,
        check=True,
    )
    counts = re.search(r"requests: (\d+) total.*?(\d+) succeeded, (\d+) failed", done.stdout)
    rate = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", done.stdout)
    if counts is None or rate is None:
        raise RuntimeError(f"cannot read h2load's output:\n{done.stdout}")
    latencies = sorted(
        int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line
    )
    if not latencies:
        raise RuntimeError(f"h2load logged no request:\n{done.stdout}")
    return Load(
        concurrency,
        int(counts[2]),
        int(counts[3]),
        float(rate[1]),
        statistics.median(latencies),
        latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    )


def start_bare(response: Path, loop: str, log: Path, core: int | None) -> tuple[Process, int]:
    process = Process(
        pinned([sys.executable, "-m", "bench.bare", str(response), f"--loop={loop}"], core), log
    )
    return process, int(process.wait_json("port")["port"])


@dataclass
class Server:
    """One server under load: the broker in some configuration, or a bare handler."""

    name: str
    port: int
    pid: int
    loop: str
    codes: Callable[[], dict[str, float]] | None = None  # the broker's RPCs by status code


def _codes(broker: RunningBroker) -> Callable[[], dict[str, float]]:
    def read() -> dict[str, float]:
        counts: dict[str, float] = {}
        for line in broker.scrape().splitlines():
            found = re.match(
                r'broker_rpcs_total\{code="(\w+)",method="IssueCredentials"\} ([\d.e+]+)', line
            )
            if found:
                counts[found[1]] = float(found[2])
        return counts

    return read


def measure(
    server: Server, frame: Path, concurrency: int, seconds: int, log: Path
) -> tuple[Load, float]:
    """One h2load run, and the server's CPU time per answered call (µs)."""
    before = cpu_seconds(server.pid)
    codes_before = server.codes() if server.codes else {}
    load = h2load(server.port, frame, concurrency, seconds, 1, log)
    spent = cpu_seconds(server.pid) - before
    if server.codes is not None:
        after = server.codes()
        delta = {k: after.get(k, 0) - codes_before.get(k, 0) for k in after}
        others = {k: v for k, v in delta.items() if k not in ("OK", "CANCELLED") and v}
        if others or delta.get("OK", 0) < load.succeeded or delta.get("CANCELLED", 0) > concurrency:
            raise RuntimeError(f"{server.name}: not every answer was OK: {delta}, h2load {load}")
    if load.failed:
        raise RuntimeError(f"{server.name}: h2load saw {load.failed} failed requests")
    # h2load's count covers the measured period; the CPU time also covers the warm-up second.
    answered = load.succeeded * (seconds + 1) / seconds
    return load, spent / answered * 1e6


async def run(world: World, report: Report, *, quick: bool) -> None:
    section = "Hot path: IssueCredentials from the cache"
    concurrencies = (1, 16) if quick else (1, 16, 64)
    seconds, rounds = (1, 1) if quick else (2, 2)
    loops = ("uvloop",) if quick else ("uvloop", "asyncio")  # the default first
    with contextlib.ExitStack() as stack:
        servers: list[tuple[Server, Server]] = []  # (broker, its bare ceiling)
        frames: dict[str, Path] = {}
        for loop in loops:
            variants: list[tuple[str, dict[str, Any]]] = [("broker", {})] + (
                [] if loop != "uvloop" else [("broker, RPC_LOG=errors", {"rpc_log": "errors"})]
            )
            for name, settings in variants:
                tenant = f"hot-{loop}-{len(servers)}"
                broker = stack.enter_context(world.broker(f"{tenant}", event_loop=loop, **settings))
                async with stub_for(broker.target) as (stub,):
                    await connect(world, stub, tenant)
                    request = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run-1")
                    response = await stub.IssueCredentials(request)
                frame = world.folder / f"{tenant}.frame"
                frame.write_bytes(grpc_frame(request))
                frames[tenant] = frame
                answer = world.folder / f"{tenant}.response"
                answer.write_bytes(response.SerializeToString())
                bare, port = start_bare(
                    answer, loop, world.folder / f"bare-{tenant}.log", SERVER_CORE
                )
                stack.callback(bare.stop)
                servers.append(
                    (
                        Server(
                            f"{name} ({loop})",
                            broker.port,
                            broker.process.process.pid,
                            loop,
                            _codes(broker),
                        ),
                        Server(f"bare handler ({loop})", port, bare.process.pid, loop),
                    )
                )
        measured: dict[tuple[str, int], list[tuple[Load, float]]] = {}
        for concurrency in concurrencies:
            for _ in range(rounds):  # side by side: each round loads every server in turn
                for index, pair in enumerate(servers):
                    for server in pair:
                        frame = frames[f"hot-{pair[0].loop}-{index}"]
                        result = measure(
                            server, frame, concurrency, seconds, world.folder / "h2load.log"
                        )
                        measured.setdefault((server.name, concurrency), []).append(result)
    report.note(
        section,
        "h2load (one h2c connection, `c` streams in flight, pre-encoded gRPC frames) on core 0; "
        "each server pinned to core 1. Every round loads each broker and its bare handler "
        f"(same server options, same response bytes) in turn: {rounds} round(s) of {seconds} s "
        "after 1 s of warm-up, medians shown. Every answer was checked OK (the broker's "
        "`broker_rpcs_total` by code). CPU µs per call is the server's user+system time.",
    )
    for concurrency in concurrencies:
        for ours_server, bare_server in servers:
            ours = measured[(ours_server.name, concurrency)]
            ceiling = measured[(bare_server.name, concurrency)]
            rps, base_rps = _median(x.rps for x, _ in ours), _median(x.rps for x, _ in ceiling)
            p50, base_p50 = (
                _median(x.p50_ms for x, _ in ours),
                _median(x.p50_ms for x, _ in ceiling),
            )
            p99, base_p99 = (
                _median(x.p99_ms for x, _ in ours),
                _median(x.p99_ms for x, _ in ceiling),
            )
            cpu, base_cpu = _median(c for _, c in ours), _median(c for _, c in ceiling)
            label = f"{ours_server.name}, c={concurrency}"
            report.add(
                Figure(
                    section,
                    f"{label}: throughput",
                    rps,
                    "RPC/s",
                    base_rps,
                    bare_server.name,
                    "≥ 0.9×",
                    rps >= 0.9 * base_rps,
                )
            )
            report.add(Figure(section, f"{label}: p50", p50, "ms", base_p50, bare_server.name))
            report.add(
                Figure(
                    section,
                    f"{label}: p99",
                    p99,
                    "ms",
                    base_p99,
                    bare_server.name,
                    "≤ 1.2×",
                    p99 <= 1.2 * base_p99,
                )
            )
            report.add(
                Figure(section, f"{label}: CPU per call", cpu, "µs", base_cpu, bare_server.name)
            )


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))
