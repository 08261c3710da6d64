"""`broker serve | dev | dev-stack | template`: flags and environment in, a running broker out."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from broker import logs
from broker.auth import TOKEN_NAME, hash_token, new_token
from broker.config import (
    ConfigError,
    describe_settings,
    is_loopback,
    load_settings,
    split_host_port,
)
from broker.template import template_body

PRINCIPAL_VARIABLE = "BROKER_TRUSTED_PRINCIPAL_ARN"
DEV_BANNER = """\
================================================================================
 credential broker: DEVELOPMENT MODE
 AWS here is a LOCAL EMULATOR (moto, with trust policies enforced) at {aws}
 Nothing reaches real AWS. Every account, role and credential is fake.

 broker (gRPC, plaintext, loopback): {listen}
 connections database:               {database}
 broker's identity (emulated):       {principal}
 metrics (Prometheus):               {metrics}
 drain on Ctrl-C/SIGTERM:            {drain:g} s (BROKER_DRAIN_SECONDS; 0 unless set)

 Walk the flow with grpcurl (see README):
   grpcurl -plaintext -d '{{"tenant_id":"acme"}}' {listen} \\
       broker.v1.CredentialBroker/CreateConnection
   broker dev-stack '<quick_create_url>'     # creates the customer's stack in the emulator
================================================================================"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="broker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve",
        help="run the broker (configured by BROKER_* variables)",
        description="Run the gRPC broker until SIGTERM/SIGINT. Configuration (environment):\n\n"
        + describe_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dev = commands.add_parser(
        "dev", help="run the broker on embedded defaults against a local AWS emulator"
    )
    dev.add_argument("--aws-port", type=int, default=5000, help="emulator port (default 5000)")
    stack = commands.add_parser(
        "dev-stack", help="create a customer's stack in the local emulator from a quick-create link"
    )
    stack.add_argument("quick_create_url")
    stack.add_argument(
        "--aws-endpoint",
        help="the emulator's URL; default: the one the link's templateURL names, on loopback "
        "(where `broker dev` published the template)",
    )
    template = commands.add_parser(
        "template",
        help="print the customer's CloudFormation template, made for this deployment's principal",
        description="Print the template to publish at BROKER_TEMPLATE_URL. The role it creates "
        "trusts exactly the given principal (no link parameter can change that): publish it "
        "again whenever the principal changes.",
    )
    template.add_argument(
        "--trusted-principal-arn",
        metavar="ARN",
        help=f"the IAM role (or user) ARN customers' roles trust; default: ${PRINCIPAL_VARIABLE}",
    )
    commands.add_parser(
        "migrate",
        help="bring the store's schema (BROKER_DATABASE_URL) up to date; `serve` does it too",
    )
    token = commands.add_parser(
        "token", help="make a bearer token for a caller, and the hash the broker is configured with"
    )
    token.add_argument(
        "identity", help="the token's name, e.g. launcher (BROKER_POLICY calls it token:launcher)"
    )
    sandbox = commands.add_parser(
        "sandbox-endpoint",
        help="serve one run's credentials to the AWS SDKs in its sandbox, renewed as they expire",
        description="Holds the run's WatchCredentials stream and serves the container-credentials "
        "protocol on loopback. Prints AWS_CONTAINER_CREDENTIALS_FULL_URI and "
        "AWS_CONTAINER_AUTHORIZATION_TOKEN for the sandbox once it holds credentials; exits when "
        "the run is released or the tenant disconnected.",
    )
    sandbox.add_argument("--tenant", required=True)
    sandbox.add_argument("--run", required=True)
    sandbox.add_argument("--broker", default="127.0.0.1:50051", help="the broker's host:port")
    sandbox.add_argument("--listen", default="127.0.0.1:0", help="loopback host:port to serve on")
    sandbox.add_argument("--ca-file", type=Path, help="CA of the broker's TLS certificate")
    sandbox.add_argument("--cert-file", type=Path, help="this launcher's certificate (mTLS)")
    sandbox.add_argument("--key-file", type=Path, help="this launcher's key (mTLS)")
    sandbox.add_argument("--token-file", type=Path, help="a file holding the broker bearer token")
    args = parser.parse_args(argv)
    try:
        if args.command == "template":
            sys.stdout.write(_template(args.trusted_principal_arn))
        elif args.command == "serve":
            _serve()
        elif args.command == "dev":
            _dev(args.aws_port)
        elif args.command == "dev-stack":
            _dev_stack(args.quick_create_url, args.aws_endpoint)
        elif args.command == "sandbox-endpoint":
            _sandbox_endpoint(args)
        elif args.command == "migrate":
            asyncio.run(_migrate())
        elif args.command == "token":
            if not TOKEN_NAME.fullmatch(args.identity):
                raise ConfigError(
                    f"{args.identity[:64]!r} is not a token name (1-128 of A-Z a-z 0-9 . _ -)"
                )
            secret = new_token()
            print(f"token (give it to {args.identity} only; it is not stored): {secret}")
            print(f"BROKER_TOKEN_HASHES entry: {args.identity}={hash_token(secret)}")
            print(f"BROKER_POLICY names this caller: token:{args.identity}")
    except ConfigError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _template(flag: str | None) -> str:
    # The one variable is read on its own, not through load_settings: printing a template must
    # not need the rest of a serving configuration to be valid.
    source, arn = ("--trusted-principal-arn", flag)
    if flag is None:
        source, arn = (PRINCIPAL_VARIABLE, os.environ.get(PRINCIPAL_VARIABLE) or None)
    if arn is None:
        raise ConfigError(
            f"template: give --trusted-principal-arn ARN or set {PRINCIPAL_VARIABLE}: the "
            "principal customers' roles will trust"
        )
    try:
        return template_body(arn)
    except ValueError as exc:
        raise ConfigError(f"template: {source}: {exc}") from None


def _serve() -> None:
    from broker.server import run_loop, serve

    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    run_loop(serve(settings), settings.event_loop)


def _sandbox_endpoint(args: argparse.Namespace) -> None:
    from broker import sandbox
    from broker.client import BrokerClient, ClientTls, PlaintextRefused, check_transport

    host, port = split_host_port(args.listen)
    if not is_loopback(host):
        raise ConfigError(
            f"--listen {args.listen}: the endpoint serves credentials on loopback only"
        )
    if (args.cert_file or args.key_file) and not args.ca_file:
        raise ConfigError("--cert-file and --key-file (mTLS) need --ca-file (the broker's CA)")
    logs.configure("INFO", "text")
    tls = ClientTls(args.ca_file, args.cert_file, args.key_file) if args.ca_file else None
    try:
        check_transport(args.broker, tls)  # before the token is even read
        token = args.token_file.read_text().strip() if args.token_file else None
    except PlaintextRefused as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"--token-file: cannot read it ({exc.strerror})") from None

    async def serve() -> None:
        async with BrokerClient(args.broker, tls=tls, token=token) as client:
            await sandbox.run(client, args.tenant, args.run, (host, port))

    asyncio.run(serve())


async def _migrate() -> None:
    from broker.store import open_store

    settings = load_settings()
    store = await open_store(settings.database_url)  # opening migrates, under a lock
    await store.close()
    print("schema up to date")


def _dev(aws_port: int) -> None:
    from broker.emulator import LocalAws
    from broker.server import Broker, run_loop, serve

    try:
        aws = LocalAws(port=aws_port).start()
    except OSError as exc:
        raise ConfigError(
            f"cannot start the local AWS emulator on port {aws_port}: {exc}"
        ) from None
    identity = aws.create_user("credential-broker")
    overrides: dict[str, object] = {
        "aws_endpoint_url": aws.endpoint_url,
        "template_url": aws.publish_template(identity.arn),
        "trusted_principal_arn": identity.arn,
    }
    if "BROKER_DATABASE_URL" not in os.environ:
        # The emulator forgets everything when it stops; so does the development database.
        folder = tempfile.mkdtemp(prefix="broker-dev-")
        overrides["database_url"] = f"sqlite:///{folder}/broker.db"
    # A newcomer reads the console: plain lines unless BROKER_LOG_FORMAT says otherwise.
    overrides.setdefault("log_format", os.environ.get("BROKER_LOG_FORMAT", "text"))
    if "BROKER_DRAIN_SECONDS" not in os.environ:
        # One local process and no load balancer to move callers away: Ctrl-C stops it now.
        overrides["drain_seconds"] = 0
    settings = load_settings(**overrides)
    logs.configure(settings.log_level, settings.log_format)

    def banner(broker: Broker) -> None:
        host = settings.listen.rpartition(":")[0]
        print(
            DEV_BANNER.format(
                aws=aws.endpoint_url,
                listen=f"{host}:{broker.port}",
                database=settings.database_url,
                principal=identity.arn,
                drain=settings.drain_seconds,
                metrics=f"http://{host}:{broker.metrics_port}/metrics"
                if broker.metrics_port
                else "off",
            ),
            file=sys.stderr,
            flush=True,
        )

    try:
        run_loop(
            serve(
                settings,
                static_credentials=(identity.access_key_id, identity.secret_access_key),
                on_ready=banner,
            ),
            settings.event_loop,
        )
    finally:
        aws.stop()


def _dev_stack(quick_create_url: str, endpoint: str | None) -> None:
    """Create the stack a quick-create link describes in the local emulator, as the customer's
    console would, and print its RoleArn. The emulator is the one the link's templateURL names
    when that is on loopback, unless `endpoint` is given. A failure is one line (exit 2)."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    from broker.emulator import EmulatorClient, endpoint_of

    try:
        published_in = endpoint_of(quick_create_url)  # ValueError: not a quick-create link
    except ValueError as exc:
        raise ConfigError(f"dev-stack: {exc}") from None
    endpoint = endpoint or published_in
    if endpoint is None:
        raise ConfigError(
            "dev-stack: the link's templateURL is not in a local emulator (http://127.0.0.1:"
            "PORT/…, where `broker dev` publishes it): give --aws-endpoint"
        )
    try:
        role_arn = EmulatorClient(endpoint).create_customer_stack(quick_create_url)
    except EndpointConnectionError:
        raise ConfigError(
            f"dev-stack: nothing answers at {endpoint}: start `broker dev` (its banner names the "
            "emulator), or give --aws-endpoint"
        ) from None
    except (BotoCoreError, ClientError, ValueError, RuntimeError) as exc:
        said = " ".join(str(exc).split())  # one line
        raise ConfigError(f"dev-stack: the emulator at {endpoint} made no stack: {said}") from None
    print(role_arn)
