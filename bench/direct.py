"""The cold path's baseline: the broker's own STS client (broker.aws.AwsClient) making the
AssumeRole calls a cache miss makes, with no broker around it, from its own process on the
broker's event loop (uvloop), its STS region's endpoint set as the broker's is
(BROKER_STS_ENDPOINT_URLS). Prints JSON: the latency of each of `samples` calls made one after
another, and how long each burst of N calls at once took under the same concurrency bound.

    python -m bench.direct '{"region": …, "endpoint": …, "key": …, "secret": …, "grant": […], …}'"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import uvloop

from broker.aws import AwsClient
from broker.credentials import run_request
from broker.models import Grant


async def measure(spec: dict[str, Any]) -> dict[str, Any]:
    base = Grant(*spec["grant"])
    aws = AwsClient(
        region=spec["region"],
        regions=(spec["region"],),
        sts_endpoint_urls=(f"{spec['region']}={spec['endpoint']}",),
        static_credentials=(spec["key"], spec["secret"]),
        max_concurrency=spec["bound"],
    )
    await aws.start()
    try:
        latencies = []
        for i in range(spec["samples"]):
            started = time.perf_counter()
            await aws.assume_role(run_request(base.for_run(f"direct-{i}"), 3600, ()))
            latencies.append(time.perf_counter() - started)
        bursts = {}
        for n in spec["bursts"]:
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    aws.assume_role(run_request(base.for_run(f"direct-{n}-{i}"), 3600, ()))
                    for i in range(n)
                )
            )
            bursts[str(n)] = time.perf_counter() - started
        return {"latencies": latencies, "bursts": bursts}
    finally:
        await aws.close()


if __name__ == "__main__":
    print(json.dumps(uvloop.run(measure(json.loads(sys.argv[1])))))
