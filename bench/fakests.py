"""A minimal STS stand-in for the benchmark, in its own process: it answers sts:AssumeRole and
sts:GetCallerIdentity (botocore's query protocol over HTTP/1.1) after an added latency, with
answers the size of real ones, and counts what it answered. With it the benchmark measures the
broker's own renewal capacity, not the emulator's (moto spends milliseconds of CPU per call).

It checks no signature and no trust policy: tenants are verified against the emulator, whose
STS enforces them, and only then served from here (`World.verified_store`, `World.broker_on`).

    python -m bench.fakests [--port N] [--latency S] [--lifetime S]

It prints one JSON line, {"port": N}, once it listens. Besides STS (POST /):
- GET /stats: {"AssumeRole": answered, "GetCallerIdentity": answered, "errors": STS errors
  answered, "in_flight": AssumeRole being answered now, "most_in_flight": the most at once,
  "cpu_seconds": the stand-in's own CPU time so far};
- POST /reset: the counts to 0 (most_in_flight to what is in flight now);
- POST /config with a JSON object: `latency` (seconds), `lifetime` (seconds the credentials
  live, null: DurationSeconds as asked), `error` (null, or an STS error code every AssumeRole
  gets from then on, e.g. "Throttling" or "ServiceUnavailable", for outage rows).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs

DEFAULT_LATENCY = 0.050
CALLER_ARN = "arn:aws:iam::111111111111:user/credential-broker"
# A real AssumeRole's session token with session tags and a policy ARN is about this long (and
# the cache-memory section measures tokens of this length).
SESSION_TOKEN_CHARS = 1000
MAX_HEAD = 16 * 1024
NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
# Errors an outage row may ask for: code → (HTTP status line, fault type).
ERRORS = {
    "Throttling": ("400 Bad Request", "Sender"),
    "ServiceUnavailable": ("503 Service Unavailable", "Receiver"),
    "InternalFailure": ("500 Internal Server Error", "Receiver"),
}


@dataclass
class Sts:
    """What the stand-in answers, and its counts (changed only on its event loop)."""

    latency: float = DEFAULT_LATENCY
    lifetime: float | None = None  # None: the credentials live DurationSeconds
    error: str | None = None
    counts: dict[str, int] = field(
        default_factory=lambda: {"AssumeRole": 0, "GetCallerIdentity": 0, "errors": 0}
    )
    in_flight: int = 0
    most_in_flight: int = 0

    def stats(self) -> dict[str, float]:
        return self.counts | {
            "in_flight": self.in_flight,
            "most_in_flight": self.most_in_flight,
            "cpu_seconds": time.process_time(),
        }

    def reset(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)
        self.most_in_flight = self.in_flight

    def configure(self, changes: dict[str, Any]) -> None:
        unknown = set(changes) - {"latency", "lifetime", "error"}
        if unknown or changes.get("error") not in (None, *ERRORS):
            raise ValueError(f"cannot configure {changes!r}")
        self.latency = float(changes.get("latency", self.latency))
        self.lifetime = changes.get("lifetime", self.lifetime)
        self.error = changes.get("error", self.error)

    def answer(self, params: dict[str, str]) -> tuple[str, bytes]:
        """The status line and XML body for one STS request (its form parameters)."""
        action = params.get("Action", "")
        if action == "GetCallerIdentity":
            self.counts[action] += 1
            return "200 OK", _caller_identity()
        if action != "AssumeRole":
            return self._error("400 Bad Request", "Sender", "InvalidAction", action)
        if self.error is not None:
            return self._error(*ERRORS[self.error], self.error, "the stand-in was told to fail")
        missing = [p for p in ("RoleArn", "RoleSessionName") if not params.get(p)]
        if missing:
            return self._error("400 Bad Request", "Sender", "ValidationError", f"no {missing[0]}")
        lifetime = self.lifetime or float(params.get("DurationSeconds", "3600"))
        self.counts[action] += 1
        return "200 OK", _assume_role(params, datetime.now(UTC) + timedelta(seconds=lifetime))

    def _error(self, status: str, kind: str, code: str, message: str) -> tuple[str, bytes]:
        self.counts["errors"] += 1
        body = (
            f'<ErrorResponse xmlns="{NAMESPACE}"><Error><Type>{kind}</Type><Code>{code}</Code>'
            f"<Message>{_xml(message)}</Message></Error>"
            f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
        )
        return status, body.encode()


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _random(chars: int, *, b32: bool = False) -> str:
    """`chars` random characters of base64 (or base32: A-Z, 2-7, as in access key ids)."""
    if b32:
        return base64.b32encode(os.urandom(chars * 5 // 8 + 5)).decode()[:chars]
    return base64.b64encode(os.urandom(chars * 3 // 4 + 3)).decode()[:chars]


def _assume_role(params: dict[str, str], expires: datetime) -> bytes:
    """A real AssumeRole answer's elements and sizes: an ASIA access key, a 40-character
    secret, a session token, the assumed-role ARN naming the session, SourceIdentity echoed."""
    role_arn, session = params["RoleArn"], params["RoleSessionName"]
    account = role_arn.split(":")[4] if role_arn.count(":") >= 5 else "000000000000"
    role_name = role_arn.rsplit("/", 1)[-1]
    role_id = "AROA" + base64.b32encode(hashlib.sha256(role_arn.encode()).digest()).decode()[:17]
    token = "IQoJb3JpZ2luX2VjE" + _random(SESSION_TOKEN_CHARS - 17)
    source = params.get("SourceIdentity")
    packed = any(k.startswith(("Tags.", "PolicyArns.")) for k in params)
    body = (
        f'<AssumeRoleResponse xmlns="{NAMESPACE}"><AssumeRoleResult>'
        + (f"<SourceIdentity>{_xml(source)}</SourceIdentity>" if source else "")
        + "<AssumedRoleUser>"
        f"<AssumedRoleId>{role_id}:{_xml(session)}</AssumedRoleId>"
        f"<Arn>arn:aws:sts::{account}:assumed-role/{_xml(role_name)}/{_xml(session)}</Arn>"
        "</AssumedRoleUser><Credentials>"
        f"<AccessKeyId>ASIA{_random(16, b32=True)}</AccessKeyId>"
        f"<SecretAccessKey>{_random(40)}</SecretAccessKey>"
        f"<SessionToken>{token}</SessionToken>"
        f"<Expiration>{expires.strftime('%Y-%m-%dT%H:%M:%SZ')}</Expiration>"
        "</Credentials>"
        + ("<PackedPolicySize>9</PackedPolicySize>" if packed else "")
        + "</AssumeRoleResult>"
        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
        "</AssumeRoleResponse>"
    )
    return body.encode()


def _caller_identity() -> bytes:
    account = CALLER_ARN.split(":")[4]
    return (
        f'<GetCallerIdentityResponse xmlns="{NAMESPACE}"><GetCallerIdentityResult>'
        f"<Arn>{CALLER_ARN}</Arn><UserId>AIDA{_random(17, b32=True)}</UserId>"
        f"<Account>{account}</Account></GetCallerIdentityResult>"
        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>"
        "</GetCallerIdentityResponse>"
    ).encode()


class HttpConnection(asyncio.Protocol):
    """One client connection: HTTP/1.1 requests answered in order, kept alive. An STS request
    is answered `Sts.latency` seconds after it arrived (a timer, not a task)."""

    def __init__(self, sts: Sts) -> None:
        self.sts = sts
        self.buffer = bytearray()
        self.busy = False  # a request is being answered; the next waits in `buffer`
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def _next(self) -> None:
        assert self.transport is not None
        if self.busy:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self.transport.close()
            return
        line, *lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        length = int(headers.get("content-length") or 0)
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        method, target, *_ = line.split(" ")
        self.busy = True
        if method == "POST" and target == "/":
            self._sts(body)
        else:
            self._control(method, target, body)

    def _sts(self, body: bytes) -> None:
        params = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if params.get("Action") != "AssumeRole":
            self._respond(*self.sts.answer(params))
            return
        self.sts.in_flight += 1
        self.sts.most_in_flight = max(self.sts.most_in_flight, self.sts.in_flight)

        def answer() -> None:
            self.sts.in_flight -= 1
            self._respond(*self.sts.answer(params))

        asyncio.get_running_loop().call_later(self.sts.latency, answer)

    def _control(self, method: str, target: str, body: bytes) -> None:
        if method == "GET" and target == "/stats":
            self._respond("200 OK", json.dumps(self.sts.stats()).encode(), "application/json")
        elif method == "POST" and target == "/reset":
            self.sts.reset()
            self._respond("200 OK", b"{}", "application/json")
        elif method == "POST" and target == "/config":
            try:
                self.sts.configure(json.loads(body))
            except (ValueError, TypeError) as exc:
                self._respond("400 Bad Request", str(exc).encode(), "text/plain")
            else:
                self._respond("200 OK", b"{}", "application/json")
        else:
            self._respond("404 Not Found", b"", "text/plain")

    def _respond(self, status: str, body: bytes, kind: str = "text/xml") -> None:
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            f"x-amzn-RequestId: {uuid.uuid4()}\r\n\r\n".encode()
            + body
        )
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int, sts: Sts) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpConnection(sts), "127.0.0.1", port, backlog=4096)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    async with server:
        await server.serve_forever()


class FakeSts:
    """The stand-in run as a process (`running`): its `url`, and its counts."""

    def __init__(self, port: int, kill: Callable[[], None] | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self._kill = kill

    def kill(self) -> None:
        """SIGKILL the stand-in's process: its endpoint goes down (connections refused), as a
        regional STS endpoint that becomes unreachable."""
        if self._kill is None:
            raise RuntimeError("this stand-in was not started by `running`")
        self._kill()

    def _call(self, method: str, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(self.url + path, data=body, method=method)  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - http://127…
            return json.loads(answer.read())

    def stats(self) -> dict[str, float]:
        return dict(self._call("GET", "/stats"))

    def reset(self) -> None:
        self._call("POST", "/reset", b"")

    def configure(self, **changes: object) -> None:
        self._call("POST", "/config", json.dumps(changes).encode())


@contextlib.contextmanager
def running(
    log: Path, core: int | None, latency: float = DEFAULT_LATENCY, lifetime: float | None = None
) -> Iterator[FakeSts]:
    """The stand-in in its own process (pinned to `core`), its output in `log`."""
    from bench.procs import Process, pinned  # the server above needs none of the bench

    command = [sys.executable, "-m", "bench.fakests", f"--latency={latency}"]
    if lifetime is not None:
        command.append(f"--lifetime={lifetime}")
    process = Process(pinned(command, core), log)
    try:
        yield FakeSts(int(process.wait_json("port")["port"]), process.kill)
    finally:
        process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fakests", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--latency", type=float, default=DEFAULT_LATENCY, help="seconds added")
    parser.add_argument("--lifetime", type=float, default=None, help="seconds credentials live")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, Sts(latency=args.latency, lifetime=args.lifetime)))


if __name__ == "__main__":
    main()
