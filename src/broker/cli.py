"""`broker serve | dev | dev-stack | template`: flags and environment in, a running broker out.
For the launcher: `broker sandbox-endpoint | credential-process | config-profile`."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from broker.client import BrokerClient, BrokerClientError, ClientTls

PRINCIPAL_VARIABLE = "BROKER_TRUSTED_PRINCIPAL_ARN"
LAUNCHER_COMMANDS = ("sandbox-endpoint", "credential-process", "config-profile")
# Exit codes of the commands that talk to the broker (README, "For the launcher").
EXIT_OK = 0  # done; for sandbox-endpoint: the run was released
EXIT_BROKER_FAILED = 1  # the broker failed in a way none of the others says (INTERNAL, ...)
EXIT_USAGE = 2  # flags wrong, or a tenant or run id the broker calls malformed
EXIT_REFUSED = 3  # not connected, disconnected, unknown tenant, permission: do not retry
EXIT_UNAVAILABLE = 4  # no broker answered within --connect-timeout: retry later
EXIT_CODES_HELP = """\
exit codes: 0 done (sandbox-endpoint: the run was released); 2 usage, or a malformed tenant or
run id; 3 refused for good (tenant not connected or disconnected, unknown tenant, permission
denied, role not assumable): do not retry; 4 broker unavailable for --connect-timeout: retry
later; 1 any other broker failure. A failure prints one line on stderr."""
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+@-]{0,63}", re.ASCII)
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
DEV_REGIONS = """\
 STS regions (BROKER_STS_REGIONS), in order, each on its own emulator endpoint:
{endpoints}
 Take one down (connections refused), hang it, or bring it back:
   curl -X POST {aws}/_emulator/regions/{first}/down      # or /hang, /up
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
    launcher = _launcher_flags()
    sandbox = commands.add_parser(
        "sandbox-endpoint",
        parents=[launcher],
        help="serve one run's credentials to the AWS SDKs in its sandbox, renewed as they expire",
        description="Holds the run's WatchCredentials stream and serves the container-credentials "
        "protocol on loopback. Once it holds credentials it prints what a bare sandbox needs "
        "(AWS_CONTAINER_CREDENTIALS_FULL_URI, AWS_CONTAINER_AUTHORIZATION_TOKEN, AWS_REGION, "
        "AWS_DEFAULT_REGION) as KEY=value lines a shell can eval, or with --format json as one "
        "JSON object on one line, then closes its standard output; it exits 0 when the run is "
        "released.",
        epilog=EXIT_CODES_HELP,
    )
    sandbox.add_argument("--listen", default="127.0.0.1:0", help="loopback host:port to serve on")
    sandbox.add_argument(
        "--format", choices=("env", "json"), default="env", help="how to print the variables"
    )
    commands.add_parser(
        "credential-process",
        parents=[launcher],
        help="print the run's credentials as an AWS credential_process command does",
        description="Prints the AWS credential_process JSON (Version 1, AccessKeyId, "
        "SecretAccessKey, SessionToken, Expiration) for the run; see config-profile.",
        epilog=EXIT_CODES_HELP,
    )
    profile = commands.add_parser(
        "config-profile",
        parents=[launcher],
        help="print an AWS config profile whose credential_process is this broker",
        description="Asks the broker for the run's credentials (to learn their region, and to "
        "fail now rather than in the sandbox), then prints a profile section for ~/.aws/config: "
        "credential_process runs `broker credential-process` (this executable, by its absolute "
        "path) with the same flags.",
        epilog=EXIT_CODES_HELP,
    )
    profile.add_argument("--profile", required=True, type=_profile_name, help="the profile name")
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
        elif args.command in LAUNCHER_COMMANDS:
            return _launcher(args)
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


def _launcher_flags() -> argparse.ArgumentParser:
    """The flags every command that talks to the broker takes."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--tenant", required=True)
    flags.add_argument("--run", required=True)
    flags.add_argument("--broker", default="127.0.0.1:50051", help="the broker's host:port")
    flags.add_argument("--ca-file", type=Path, help="CA of the broker's TLS certificate")
    flags.add_argument("--cert-file", type=Path, help="this launcher's certificate (mTLS)")
    flags.add_argument("--key-file", type=Path, help="this launcher's key (mTLS)")
    flags.add_argument("--token-file", type=Path, help="a file holding the broker bearer token")
    flags.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up (exit 4) when no broker has answered for this long (default 10)",
    )
    flags.add_argument("--verbose", action="store_true", help="log reconnects and renewals")
    return flags


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"{text[:32]!r} is not a number of seconds in (0, 86400]")
    return value


def _profile_name(text: str) -> str:
    if not PROFILE_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text[:64]!r} is not a profile name (1-64 of A-Z a-z 0-9 _ . + @ -)"
        )
    return text


def _launcher(args: argparse.Namespace) -> int:
    """Run a command that talks to the broker; a failure is one line on stderr and an exit
    code from the table above, never a traceback."""
    from broker.client import BrokerClient, BrokerClientError
    from broker.sandbox import ListenFailed

    commands = {
        "sandbox-endpoint": _sandbox_endpoint,
        "credential-process": _credential_process,
        "config-profile": _config_profile,
    }
    work = commands[args.command](args)  # checks its own flags before anything is reached
    tls, token = _broker_access(args)
    logs.configure("INFO" if args.verbose else "WARNING", "text")

    async def talk() -> None:
        async with BrokerClient(
            args.broker, tls=tls, token=token, connect_timeout=args.connect_timeout
        ) as client:
            await work(client)

    try:
        asyncio.run(talk())
    except BrokerClientError as exc:
        print(f"broker: {exc}", file=sys.stderr, flush=True)
        return _exit_code(exc)
    except ListenFailed as exc:
        raise ConfigError(f"--listen: {exc}") from None
    return EXIT_OK


def _exit_code(error: BrokerClientError) -> int:
    from broker.client import BrokerUnavailable, InvalidRequest, Refused

    table = (
        (InvalidRequest, EXIT_USAGE),
        (Refused, EXIT_REFUSED),
        (BrokerUnavailable, EXIT_UNAVAILABLE),
    )
    return next((code for kind, code in table if isinstance(error, kind)), EXIT_BROKER_FAILED)


def _broker_access(args: argparse.Namespace) -> tuple[ClientTls | None, str | None]:
    """TLS and token from the flags; ConfigError (exit 2) for a remote broker without TLS
    (checked before the token is even read) or a file that cannot be read."""
    from broker.client import ClientTls, PlaintextRefused, check_transport

    if (args.cert_file or args.key_file) and not args.ca_file:
        raise ConfigError("--cert-file and --key-file (mTLS) need --ca-file (the broker's CA)")
    tls = ClientTls(args.ca_file, args.cert_file, args.key_file) if args.ca_file else None
    try:
        check_transport(args.broker, tls)
    except PlaintextRefused as exc:
        raise ConfigError(str(exc)) from None

    def read(flag: str) -> bytes | None:
        path = getattr(args, flag)
        try:
            return path.read_bytes() if path is not None else None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(f"--{flag.replace('_', '-')}: cannot read it ({reason})") from None

    for flag in ("ca_file", "cert_file", "key_file"):
        read(flag)  # read again by the client: a missing one is a usage error now, not later
    token = read("token_file")
    return tls, token.decode(errors="replace").strip() if token is not None else None


def _sandbox_endpoint(args: argparse.Namespace) -> Callable[[BrokerClient], Awaitable[None]]:
    from broker import sandbox
    from broker.delivery import json_line, shell_assignments

    host, port = split_host_port(args.listen)
    if not is_loopback(host):
        raise ConfigError(
            f"--listen {args.listen}: the endpoint serves credentials on loopback only"
        )

    def announce(variables: dict[str, str]) -> None:
        text = json_line(variables) if args.format == "json" else shell_assignments(variables)
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            pass  # nobody reads them: the endpoint serves on until the run is released
        # Nothing more is printed: whoever reads our output sees its end now, so
        # `eval "$(broker sandbox-endpoint ... &)"` returns while the endpoint serves on.
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, sys.stdout.fileno())
        os.close(quiet)

    async def work(client: BrokerClient) -> None:
        await sandbox.run(client, args.tenant, args.run, (host, port), announce)

    return work


def _credential_process(args: argparse.Namespace) -> Callable[[BrokerClient], Awaitable[None]]:
    async def work(client: BrokerClient) -> None:
        credentials = await client.issue_credentials(args.tenant, args.run)
        sys.stdout.write(credentials.credential_process() + "\n")

    return work


def _config_profile(args: argparse.Namespace) -> Callable[[BrokerClient], Awaitable[None]]:
    command = [*_own_command(), "credential-process", "--broker", args.broker]
    command += ["--tenant", args.tenant, "--run", args.run]
    for flag in ("ca_file", "cert_file", "key_file", "token_file"):
        path = getattr(args, flag)
        if path is not None:  # absolute: the SDK runs the command from anywhere
            command += [f"--{flag.replace('_', '-')}", str(path.absolute())]
    command += ["--connect-timeout", f"{args.connect_timeout:g}"]
    if not all(argument.isprintable() for argument in command):
        raise ConfigError("an argument holds a control character: it cannot go in a config file")

    async def work(client: BrokerClient) -> None:
        credentials = await client.issue_credentials(args.tenant, args.run)
        region = f"region = {credentials.region}\n" if credentials.region else ""
        # The config file names the default profile [default], every other one [profile NAME].
        section = "default" if args.profile == "default" else f"profile {args.profile}"
        sys.stdout.write(f"[{section}]\ncredential_process = {shlex.join(command)}\n{region}")

    return work


def _own_command() -> list[str]:
    """How to run this `broker` again: its executable's absolute path (or python -m broker)."""
    if Path(sys.argv[0]).name == "__main__.py":
        return [sys.executable, "-m", "broker"]
    return [os.path.abspath(sys.argv[0])]


async def _migrate() -> None:
    from broker.store import open_store

    settings = load_settings()
    store = await open_store(settings.database_url)  # opening migrates, under a lock
    await store.close()
    print("schema up to date")


def _dev(aws_port: int) -> None:
    from broker.emulator import LocalAws
    from broker.server import Broker, run_loop, serve

    # BROKER_STS_REGIONS set: the emulator serves each region on an endpoint of its own.
    regions = load_settings().sts_regions
    try:
        aws = LocalAws(port=aws_port, regions=regions).start()
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
    if regions:
        overrides["sts_endpoint_urls"] = aws.endpoint_urls
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
        if aws.regions:
            endpoints = "\n".join(
                f"   {name:<16} {region.endpoint_url}" for name, region in aws.regions.items()
            )
            print(
                DEV_REGIONS.format(
                    endpoints=endpoints, aws=aws.endpoint_url, first=next(iter(aws.regions))
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
