"""The hot path of another revision beside this one and the bare handler, in one run:

    python -m bench.versus REVISION        (e.g. a commit before a change to the hot path)

REVISION is checked out into a temporary git worktree and run from its `src` with this
checkout's installed dependencies. Prints throughput and the server's CPU per call at
concurrency 1, 16 and 64 (medians of rounds taken in turn), and each broker's ratio to the bare
handler."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.hot import Server, grpc_frame, measure, start_bare
from bench.world import SERVER_CORE, connect, stub_for, world
from broker.v1 import broker_pb2 as pb


async def compare(revision: str, checkout: Path, rounds: int, seconds: int, loop: str) -> None:
    with world() as aws, contextlib.ExitStack() as stack:
        servers: list[tuple[Server, Path]] = []
        response = b""
        for name, src in ((revision, checkout / "src"), ("this checkout", None)):
            tenant = f"versus-{len(servers)}"
            broker = stack.enter_context(aws.broker(tenant, src=src, event_loop=loop))
            async with stub_for(broker.target) as (stub,):
                await connect(aws, stub, tenant)
                request = pb.IssueCredentialsRequest(tenant_id=tenant, run_id="run-1")
                response = (await stub.IssueCredentials(request)).SerializeToString()
            frame = aws.folder / f"{tenant}.frame"
            frame.write_bytes(grpc_frame(request))
            servers.append((Server(name, broker.port, broker.process.process.pid, loop), frame))
        answer = aws.folder / "response"
        answer.write_bytes(response)
        bare, port = start_bare(answer, loop, aws.folder / "bare.log", SERVER_CORE)
        stack.callback(bare.stop)
        servers.append((Server("bare handler", port, bare.process.pid, loop), frame))
        for concurrency in (1, 16, 64):
            results: dict[str, list[tuple[float, float]]] = {}
            for _ in range(rounds):
                for server, frame in servers:
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
