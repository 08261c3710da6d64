"""The hot path of another revision beside this one and the bare handler, in one run:

    python -m bench.versus REVISION        (e.g. a commit before a change to the hot path)

REVISION is checked out into a temporary git worktree and run from its `src` with this
checkout's installed dependencies. Prints throughput and the server's CPU per call at
concurrency 1, 16 and 64 (medians of rounds taken in turn), and each broker's ratio to the bare
handler."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.hot import Server, grpc_frame, measure, start_bare
from bench.procs import Process, pinned
from bench.world import SERVER_CORE, World, connect, free_port, stub_for, world
from broker.v1 import broker_pb2 as pb


def _start(aws: World, name: str, src: Path | None, loop: str) -> tuple[Process, int]:
    port, metrics_port = free_port(), free_port()
    env = aws.broker_env(
        listen=f"127.0.0.1:{port}", metrics_listen=f"127.0.0.1:{metrics_port}", event_loop=loop
    )
    if src is not None:
        env["PYTHONPATH"] = str(src)
    process = Process(
        pinned([sys.executable, "-m", "broker", "serve"], SERVER_CORE),
        aws.folder / f"{name}.log",
        env=env,
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=60
        )
    return process, port


async def compare(revision: str, checkout: Path, rounds: int, seconds: int, loop: str) -> None:
    with world() as aws:
        servers: list[tuple[Server, Path, Process]] = []
        response = b""
        for name, src in ((revision, checkout / "src"), ("this checkout", None)):
            process, port = _start(aws, name.replace(" ", "-"), src, loop)
            tenant = f"versus-{len(servers)}"
            async with stub_for(f"127.0.0.1:{port}") as (stub,):
                await connect(aws, stub, tenant)
                request = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run-1")
                response = (await stub.IssueCredentials(request)).SerializeToString()
            frame = aws.folder / f"{tenant}.frame"
            frame.write_bytes(grpc_frame(request))
            servers.append((Server(name, port, process.process.pid, loop), frame, process))
        answer = aws.folder / "response"
        answer.write_bytes(response)
        bare, port = start_bare(answer, loop, aws.folder / "bare.log", SERVER_CORE)
        servers.append((Server("bare handler", port, bare.process.pid, loop), frame, bare))
        try:
            for concurrency in (1, 16, 64):
                results: dict[str, list[tuple[float, float]]] = {}
                for _ in range(rounds):
                    for server, frame, _ in servers:
                        load, cpu = measure(
                            server, frame, concurrency, seconds, aws.folder / "h2load.log"
                        )
                        results.setdefault(server.name, []).append((load.rps, cpu))
                medians = {
                    name: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
                    for name, v in results.items()
                }
                ceiling = medians["bare handler"][0]
                print(f"c={concurrency}")
                for name, (rps, cpu) in medians.items():
                    print(
                        f"  {name:>20}: {rps:7,.0f} RPC/s ({rps / ceiling:.2f}× bare), "
                        f"{cpu:4.0f} µs CPU per call"
                    )
        finally:
            for _, _, process in servers:
                process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.versus", description=__doc__)
    parser.add_argument("revision")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="BROKER_EVENT_LOOP for both, and the bare handler's loop (revisions older than the "
        "setting run on asyncio whatever it says)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="broker-versus-") as folder:
        checkout = Path(folder) / "checkout"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--quiet", str(checkout), args.revision],
            check=True,
        )
        try:
            asyncio.run(compare(args.revision, checkout, args.rounds, args.seconds, args.loop))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], check=True)


if __name__ == "__main__":
    main()
