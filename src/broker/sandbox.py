"""The sandbox credentials endpoint: holds a run's Watch stream and serves the container-
credentials protocol on loopback, so the AWS SDKs in the sandbox fetch (and refresh) credentials
by themselves through AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN.

It answers from the latest credentials it holds and never waits on the broker or STS: SDKs give
up after about two seconds.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from datetime import UTC, datetime

from aiohttp import web

from broker.client import BrokerClient
from broker.delivery import RunCredentials

log = logging.getLogger(__name__)

PATH = "/credentials"


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
        """Serve on loopback (port 0: any free one); `url` tells where."""
        app = web.Application()
        app.router.add_get(PATH, self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{self._host}:{port}{PATH}"

    async def watch(self) -> None:
        """Hold the run's stream until the run is released or the tenant disconnected."""
        async for credentials in self._client.watch_credentials(self._tenant_id, self._run_id):
            self.latest = credentials
            self._first.set()
            log.info("credentials renewed", extra={"access_key_id": credentials.access_key_id})

    async def ready(self) -> None:
        await self._first.wait()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def run(client: BrokerClient, tenant_id: str, run_id: str, listen: tuple[str, int]) -> None:
    """Serve until the run ends; print the two variables for the sandbox once ready."""
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
        print(f"AWS_CONTAINER_CREDENTIALS_FULL_URI={endpoint.url}", flush=True)
        print(f"AWS_CONTAINER_AUTHORIZATION_TOKEN={endpoint.token}", flush=True)
        await watching
    finally:
        watching.cancel()
        await endpoint.stop()
