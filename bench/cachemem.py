"""The credential cache's memory: RSS of a fresh process before and after it caches N runs.

    python -m bench.cachemem N   → prints {"runs", "rss_bytes", "payload_bytes"} as JSON

Credentials are made here, no STS involved, at realistic sizes: a 20-character access key id,
a 40-character secret, a 1,000-character session token (STS tokens with session tags and a
source identity run to about that), every string distinct."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.cache import CredentialCache
from broker.models import Credentials, Grant

TOKEN_CHARS = 1000
ROLE = "arn:aws:iam::222222222222:role/credential-broker-{tenant}"


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Made:
    """A credential source that makes distinct credentials, as STS would."""

    def __init__(self) -> None:
        self.payload = 0

    async def get(self, grant: Grant) -> Credentials:
        now = datetime.now(UTC)
        key = f"ASIA{hash(grant.run_id) & 0xFFFFFFFFFFFF:016X}"
        credentials = Credentials(
            access_key_id=key,
            secret_access_key=f"{grant.run_id}".ljust(40, "s"),
            session_token=f"{grant.run_id}".ljust(TOKEN_CHARS, "t"),
            expiration=now + timedelta(hours=1),
            assumed_role_arn=f"{grant.role_arn}/{grant.run_id}".replace(":role/", ":assumed-role/"),
            issued_at=now,
        )
        self.payload += sum(
            len(s)
            for s in (
                key,
                credentials.secret_access_key,
                credentials.session_token,
                credentials.assumed_role_arn,
            )
        )
        return credentials


async def fill(n: int) -> dict[str, int]:
    source = Made()
    cache = CredentialCache(source, refresh_margin=1200, max_entries=n)
    gc.collect()
    before = rss()
    for i in range(n):
        tenant = f"tenant-{i % 100}"
        await cache.get(
            Grant(
                tenant,
                f"run-{i:08d}",
                ROLE.format(tenant=tenant),
                f"external-{tenant}",
                "us-east-1",
            )
        )
    gc.collect()
    return {"runs": len(cache), "rss_bytes": rss() - before, "payload_bytes": source.payload}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(fill(int(sys.argv[1])))))
