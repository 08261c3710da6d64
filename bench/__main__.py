"""`make bench`: every figure beside a baseline measured in the same run, written to
docs/benchmarks.md and docs/benchmarks.json.

    python -m bench [--quick] [--out FOLDER]

Loopback only, bounded: a few minutes (`--quick`: well under a minute, for the smoke test)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from bench import hot, startup, streams, sts
from bench.report import Report, machine
from bench.world import world


async def measure(report: Report, *, quick: bool) -> None:
    with world() as aws:
        for name, part in (
            ("hot path", hot.run),
            ("STS economy", sts.economy),
            ("cold path", sts.cold),
            ("streams", streams.run),
            ("start-up", startup.run),
        ):
            started = time.monotonic()
            print(f"{name} …", flush=True)
            await part(aws, report, quick=quick)
            print(f"{name}: {time.monotonic() - started:.0f} s", flush=True)
    print("cache memory …", flush=True)
    startup.cache_memory(report, quick=quick)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts, short runs")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the table goes")
    args = parser.parse_args()
    report = Report()
    started = time.monotonic()
    asyncio.run(measure(report, quick=args.quick))
    command = "make bench" if not args.quick else "python -m bench --quick"
    report.write(args.out, machine(), command)
    missed = [f for f in report.figures if f.met is False]
    print(
        f"wrote {args.out / 'benchmarks.md'} in {time.monotonic() - started:.0f} s; "
        f"{len(missed)} target(s) missed" + "".join(f"\n  missed: {f.what}" for f in missed)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
