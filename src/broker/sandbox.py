"""The sandbox credentials endpoint: holds a run's Watch stream and serves the container-
credentials protocol on loopback, so the AWS SDKs in the sandbox fetch (and refresh) credentials
by themselves through AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN;
AWS_REGION and AWS_DEFAULT_REGION (the credentials' region) complete what a bare sandbox needs.

It answers from the latest credentials it holds and never waits on the broker or STS: SDKs give
up after about two seconds.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime

from aiohttp import web

from broker.client import BrokerClient
from broker.delivery import RunCredentials

log = logging.getLogger(__name__)

PATH = "/credentials"


class ListenFailed(Exception):
    """The endpoint could not serve on the address it was given."""


class SandboxEndpoint:
    """`latest` is replaced by the watch task as new credentials arrive; requests only read it."""

    def __init__(
        self, client: BrokerClient, tenant_id: str, run_id: str, *, host: str, port: int
    ) -> None:
        self._client = client
        self._tenant_id, self._run_id = tenant_id, run_id
        self._host, self._port = host, port
        self.token = secrets.token_urlsafe(32)
        self.latest: RunCredentials | None = None
        self._first = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _answer(self, request: web.Request) -> web.Response:
        presented = request.headers.get("Authorization", "")
        if not hmac.compare_digest(presented.encode(), self.token.encode()):
            return web.json_response({"message": "unauthorized"}, status=401)
        held = self.latest
        if held is None or held.expiration <= datetime.now(UTC):
            return web.json_response({"message": "no valid credentials yet"}, status=503)
        return web.json_response(held.container_credentials())

    async def start(self) -> None:
        """Serve on loopback (port 0: any free one); `url` tells where. ListenFailed if it
        cannot."""
        app = web.Application()
        app.router.add_get(PATH, self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            reason = exc.strerror or type(exc).__name__
            raise ListenFailed(f"cannot serve on {self._host}:{self._port} ({reason})") from None
        port = self._runner.addresses[0][1]
        self.url = f"http://{self._host}:{port}{PATH}"

    def env(self) -> dict[str, str]:
        """The variables a bare sandbox needs: where to fetch credentials, the token to show,
        and the region the credentials are for (once it holds credentials)."""
        region = self.latest.region if self.latest is not None else ""
        region_env = {"AWS_REGION": region, "AWS_DEFAULT_REGION": region} if region else {}
        return {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": self.url,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": self.token,
            **region_env,
        }

    async def watch(self) -> None:
        """Hold the run's stream until the run is released (then return) or the broker will
        not serve it (then raise what the client raised: broker.client.BrokerClientError)."""
        async for credentials in self._client.watch_credentials(self._tenant_id, self._run_id):
            self.latest = credentials
            self._first.set()
            log.info("credentials renewed", extra={"access_key_id": credentials.access_key_id})

    async def ready(self) -> None:
        await self._first.wait()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def run(
    client: BrokerClient,
    tenant_id: str,
    run_id: str,
    listen: tuple[str, int],
    announce: Callable[[dict[str, str]], None],
) -> None:
    """Serve until the run is released; hand `announce` the sandbox's variables (`env()`)
    once the first credentials are held. Raises what ended the watch otherwise."""
    endpoint = SandboxEndpoint(client, tenant_id, run_id, host=listen[0], port=listen[1])
    await endpoint.start()
    watching = asyncio.create_task(endpoint.watch())
    try:
        ready = asyncio.create_task(endpoint.ready())
        await asyncio.wait({ready, watching}, return_when=asyncio.FIRST_COMPLETED)
        if watching.done():
            ready.cancel()
            await watching  # raises what ended it
            return
        announce(endpoint.env())
        await watching
    finally:
        watching.cancel()
        await endpoint.stop()
