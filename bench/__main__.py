"""`make bench`: every figure beside a baseline measured in the same run, written to
docs/benchmarks.md and docs/benchmarks.json.

    python -m bench [--quick] [--out FOLDER] [--only PART …]

Loopback only, bounded: a few minutes (`--quick`: well under a minute, for the smoke test).
`--only` measures the parts named (e.g. `--only streams`): give `--out` a scratch folder."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

from bench import fairshare, hot, startup, storm, streams, sts, waits
from bench.report import Report, machine
from bench.world import World, world

Part = Callable[..., Awaitable[None]]  # (world, report, *, quick) → figures in the report

# Each part adds its own section's figures, in this order.
PARTS: dict[str, Part] = {
    "hot path": hot.run,
    "fair share": fairshare.run,
    "STS economy": sts.economy,
    "cold path": sts.cold,
    "nobody waits on STS": waits.run,
    "streams": streams.run,
    "reconnect storm": storm.run,
    "reconnect storm, default limits": fairshare.storm_default_limits,
    "start-up": startup.run,
}
CACHE_MEMORY = "cache memory"  # no broker, no emulator: its own processes


async def measure(report: Report, *, quick: bool, only: Collection[str] = ()) -> None:
    chosen = [name for name in PARTS if not only or name in only]
    if chosen:
        with world() as aws:
            for name in chosen:
                await _timed(name, PARTS[name], aws, report, quick=quick)
    if not only or CACHE_MEMORY in only:
        print(f"{CACHE_MEMORY} …", flush=True)
        startup.cache_memory(report, quick=quick)


async def _timed(name: str, part: Part, aws: World, report: Report, *, quick: bool) -> None:
    started = time.monotonic()
    print(f"{name} …", flush=True)
    await part(aws, report, quick=quick)
    print(f"{name}: {time.monotonic() - started:.0f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts, short runs")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the table goes")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[*PARTS, CACHE_MEMORY],
        default=(),
        metavar="PART",
        help=f"measure only these: {', '.join(map(repr, [*PARTS, CACHE_MEMORY]))}",
    )
    args = parser.parse_args()
    report = Report()
    started = time.monotonic()
    asyncio.run(measure(report, quick=args.quick, only=args.only))
    command = "make bench"
    if args.quick or args.only:
        command = "python -m bench" + (" --quick" if args.quick else "")
        command += "".join(f" --only '{name}'" for name in args.only)
    report.write(args.out, machine(), command)
    missed = [f for f in report.figures if f.met is False]
    print(
        f"wrote {args.out / 'benchmarks.md'} in {time.monotonic() - started:.0f} s; "
        f"{len(missed)} target(s) missed" + "".join(f"\n  missed: {f.what}" for f in missed)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
