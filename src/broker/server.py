"""grpc.aio wiring: the broker's service, health, reflection, server limits, and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import start_http_server

from broker import logs, wire
from broker.auth import Guard, parse_token_hashes
from broker.aws import AwsClient
from broker.cache import CredentialCache
from broker.config import ConfigError, Settings, split_host_port
from broker.connections import Connections
from broker.connections import Settings as ConnectionSettings
from broker.credentials import ConfirmedSource, StsSource
from broker.errors import BrokerError, ShuttingDown, StreamEnded
from broker.metrics import Metrics
from broker.quotas import Limits, TenantShare, limit_settings
from broker.service import CredentialBrokerService
from broker.store import ConnectionStore, open_store
from broker.streams import StreamHub
from broker.sync import TenantSync
from broker.v1 import broker_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = broker_pb2.DESCRIPTOR.services_by_name["CredentialBroker"].full_name
SWEEP_INTERVAL = 60.0
SCRAPE_STORE_TIMEOUT = 1.0
MAX_MESSAGE_BYTES = 64 * 1024  # requests are a few hundred bytes; anything larger is not ours
STREAMS_ENDED_EVERY = 0.05  # seconds, while the server stops: see Broker._drain


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Limits set on purpose: a reconnect storm queues in core rather than being dropped."""
    return [
        ("grpc.server.max_pending_requests", settings.max_pending_requests),
        ("grpc.server.max_pending_requests_hard_limit", settings.max_pending_requests),
        ("grpc.server_max_unrequested_time_in_server", settings.max_pending_seconds),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
        ("grpc.so_reuseport", 0),
    ]


@dataclass
class Broker:
    """A running broker: its server and everything the server's handlers hold."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    aws: AwsClient
    store: ConnectionStore
    cache: CredentialCache
    hub: StreamHub
    sync: TenantSync
    _background: list[asyncio.Task[None]]
    health_server: grpc.aio.Server | None = None
    metrics_server: WSGIServer | None = None

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else self.metrics_server.server_port

    _stopping: asyncio.Task[None] | None = None
    # Set by `end_drain` (a second signal): the drain stops waiting, the grace is kept.
    _drain_cut: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    async def stop(self, grace: float | None = None, *, drain: float = 0.0) -> None:
        """Shut down: health NOT_SERVING (on the gRPC port and BROKER_HEALTH_LISTEN); serve
        every RPC as before for `drain` seconds, so probes and load balancers move callers away
        first (`serve` passes BROKER_DRAIN_SECONDS on a signal; the default is no drain); then
        stop accepting, end streams with UNAVAILABLE, give calls in flight `grace` seconds
        (BROKER_SHUTDOWN_GRACE by default), and close. Calling it again waits for the first
        call's shutdown."""
        if self._stopping is None:
            grace = self.settings.shutdown_grace if grace is None else grace
            self._stopping = asyncio.create_task(self._drain(grace, drain))
        await asyncio.shield(self._stopping)

    def end_drain(self) -> None:
        """Stop accepting now rather than at the drain's end (an operator's second Ctrl-C);
        calls in flight still get their grace."""
        self._drain_cut.set()

    async def _drain(self, grace: float, drain: float) -> None:
        await self.health.enter_graceful_shutdown()
        if drain > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain_cut.wait(), drain)
        log.info("stopped accepting calls", extra={"grace_s": grace})
        # Stop accepting first: a stream ended before that could be opened again on this
        # very connection. Then end streams until the server has stopped, so that a stream
        # accepted just before subscribes, and is ended, rather than cancelled at the grace's end.
        stopping = asyncio.create_task(self.server.stop(grace))
        await asyncio.sleep(0)  # its first step: core stops accepting and sends GOAWAY
        ending = ShuttingDown("the broker is shutting down; reconnect to another replica")
        while not stopping.done():
            self.hub.end_all(ending)
            await asyncio.wait({stopping}, timeout=STREAMS_ENDED_EVERY)
        await stopping
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.cache.close()
        await self.aws.close()
        await self.store.close()


async def start(settings: Settings, *, static_credentials: tuple[str, str] | None = None) -> Broker:
    """Build every part from `settings`, start serving, and report SERVING."""
    logs.protect_secrets()
    if not settings.template_url:
        raise ConfigError(
            "BROKER_TEMPLATE_URL is required: the HTTPS URL where the customer's CloudFormation "
            "template (`broker template`) is published, e.g. in S3. `broker dev` sets one."
        )
    metrics = Metrics()
    aws = AwsClient(
        region=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        regions=settings.regions,
        sts_endpoint_urls=settings.sts_endpoint_urls,
        cooldown=settings.sts_region_cooldown,
        static_credentials=static_credentials,
        max_concurrency=settings.sts_max_concurrency,
        metrics=metrics,
    )
    await aws.start()
    try:
        principal = settings.trusted_principal_arn or await aws.caller_arn()
    except BrokerError as exc:
        await aws.close()
        raise ConfigError(
            f"cannot learn the broker's AWS identity ({exc}); set BROKER_TRUSTED_PRINCIPAL_ARN "
            "or give the broker AWS credentials"
        ) from None
    try:
        store = await open_store(
            settings.database_url, tenant_max_events=settings.tenant_max_events
        )
    except BrokerError as exc:
        await aws.close()
        raise ConfigError(f"BROKER_DATABASE_URL: cannot open the store ({exc})") from None
    except (ValueError, OverflowError) as exc:  # a URL asyncpg cannot parse (port, brackets)
        await aws.close()
        raise ConfigError(
            f"BROKER_DATABASE_URL is not a database URL asyncpg can use ({type(exc).__name__})"
        ) from None
    hub = StreamHub()

    def role_changed(tenant_id: str) -> None:
        cache.evict_tenant(tenant_id)
        hub.wake_tenant(tenant_id)

    def disconnected(tenant_id: str) -> None:
        cache.evict_tenant(tenant_id)
        hub.end_tenant(
            tenant_id,
            StreamEnded(
                f"tenant {tenant_id!r} was disconnected",
                tenant_id,
                reason="TENANT_DISCONNECTED",
                metadata={"tenant_id": tenant_id},
            ),
        )

    def suspended(tenant_id: str) -> None:
        cache.evict_tenant(tenant_id)
        hub.end_tenant(
            tenant_id,
            StreamEnded(
                f"the connection of tenant {tenant_id!r} was suspended: its role no longer "
                "passes verification (GetConnection says why)",
                tenant_id,
                reason="CONNECTION_SUSPENDED",
                metadata={"tenant_id": tenant_id},
            ),
        )

    connections = Connections(
        store,
        aws,
        ConnectionSettings(
            template_url=settings.template_url,
            trusted_principal_arn=principal,
            default_region=settings.aws_region,
            session_duration=settings.session_duration,
            policy_arns=settings.session_policy_arns,
            verify_wait=settings.verify_wait,
            grant_max_staleness=settings.grant_max_staleness,
            store_read_timeout=settings.store_read_timeout,
        ),
        on_role_changed=role_changed,
        on_disconnected=disconnected,
        on_suspended=suspended,
    )
    policy = settings.load_policy()
    limits = Limits(limit_settings(settings, policy), metrics.registry)
    sts = StsSource(
        aws, duration=settings.session_duration, policy_arns=settings.session_policy_arns
    )
    cache = CredentialCache(
        ConfirmedSource(TenantShare(sts, limits), connections),
        refresh_margin=settings.refresh_margin,
        refresh_mandatory=settings.refresh_mandatory,
        max_entries=settings.cache_max_entries,
        admit=limits.new_session,
    )
    server = grpc.aio.server(options=server_options(settings))
    guard = Guard(
        mtls=settings.tls_client_ca_file is not None,
        token_hashes=parse_token_hashes(settings.token_hashes),
        policy=policy,
    )
    service = CredentialBrokerService(
        connections,
        cache,
        hub,
        limits,
        guard=guard,
        metrics=metrics,
        refresh_margin=settings.refresh_margin,
        max_call_seconds=settings.max_call_seconds,
        rpc_log=settings.rpc_log,
    )
    wire.add_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, wire.GenericOnly(server))
    # reflection.enable_server_reflection, added as a generic handler only.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        ),
        wire.GenericOnly(server),
    )
    health_server = None
    try:
        port = _bind(
            server,
            "BROKER_LISTEN",
            settings.listen,
            server_credentials(settings) if settings.tls else None,
        )
        if settings.health_listen is not None:
            health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
            _bind(health_server, "BROKER_HEALTH_LISTEN", settings.health_listen)
        metrics_server = _serve_metrics(settings.metrics_listen, metrics)
    except ConfigError:
        await aws.close()
        await store.close()
        raise
    await server.start()
    if health_server is not None:
        await health_server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    sync = TenantSync(store, cache, hub, forget=connections.forget, metrics=metrics)
    background = [
        asyncio.create_task(_sweep_forever(cache), name="cache-sweeper"),
        asyncio.create_task(
            store.listen(sync.on_change, sync.on_missed, sync.on_listener_error),
            name="store-listener",
        ),
        asyncio.create_task(sync.recheck_forever(settings.recheck_interval), name="recheck"),
        asyncio.create_task(
            sync.reverify_forever(settings.reverify_interval, connections.recheck_role),
            name="reverify",
        ),
        asyncio.create_task(service.cap.watch(), name="call-cap"),
    ]
    loop = asyncio.get_running_loop()

    def count_connections() -> dict[str, int]:
        """From the scrape's thread: ask the store on the broker's loop, briefly."""
        try:
            counts = asyncio.run_coroutine_threadsafe(store.count_by_status(), loop)
            return counts.result(timeout=SCRAPE_STORE_TIMEOUT)
        except Exception:  # the store is down or slow: the scrape goes on without the counts
            return {}

    metrics.watch(cache, hub, settings.cache_max_entries, count_connections)
    broker = Broker(
        settings,
        server,
        port,
        health_servicer,
        aws,
        store,
        cache,
        hub,
        sync,
        background,
        health_server=health_server,
        metrics_server=metrics_server,
    )
    log.info(
        "serving",
        extra={
            "listen": settings.listen,
            "port": port,
            "tls": settings.tls,
            "mtls": settings.tls_client_ca_file is not None,
            "tokens": len(settings.token_hashes),
            "trusted_principal": principal,
            "health_listen": settings.health_listen,
            "metrics_port": broker.metrics_port,
            "event_loop": type(asyncio.get_running_loop()).__module__.partition(".")[0],
        },
    )
    return broker


def _bind(
    server: grpc.aio.Server,
    setting: str,
    address: str,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Listen on `address` (TLS with `credentials`); a taken or wrong address stops start-up
    with the setting named. The health port, if any, serves grpc.health.v1 alone, in plaintext:
    what a kubelet's gRPC probe can reach."""
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials
            else server.add_insecure_port(address)
        )
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigError(f"{setting}={address}: cannot listen there (address in use?)")
    return port


def _serve_metrics(listen: str, metrics: Metrics) -> WSGIServer | None:
    if listen == "off":
        return None
    host, port = split_host_port(listen)
    try:
        server, _ = start_http_server(port, host, metrics.registry)
    except OSError as exc:
        raise ConfigError(f"BROKER_METRICS_LISTEN={listen}: cannot listen there ({exc})") from None
    return server


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS with the configured certificate; with a client CA, every caller must present a
    certificate it signed (mTLS)."""
    assert settings.tls_cert_file is not None
    assert settings.tls_key_file is not None
    client_ca = settings.tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


async def _sweep_forever(cache: CredentialCache) -> None:
    while True:
        await asyncio.sleep(SWEEP_INTERVAL)
        cache.sweep()


def run_loop(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run `main` to the end on a new event loop of the kind named (BROKER_EVENT_LOOP)."""
    factory = None
    if event_loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


async def serve(
    settings: Settings,
    *,
    static_credentials: tuple[str, str] | None = None,
    on_ready: Callable[[Broker], None] = lambda _: None,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down with the drain (`Broker.stop`); a second
    signal ends the drain at once, not the grace of calls in flight."""
    broker = await start(settings, static_credentials=static_credentials)
    on_ready(broker)
    signalled = asyncio.Event()

    def on_signal() -> None:
        if signalled.is_set():
            log.info("second signal: ending the drain now")
            broker.end_drain()
        signalled.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await signalled.wait()
    log.info(
        "draining",
        extra={"drain_s": settings.drain_seconds, "grace_s": settings.shutdown_grace},
    )
    await broker.stop(drain=settings.drain_seconds)
    log.info("stopped")
