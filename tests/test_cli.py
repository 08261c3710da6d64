"""The commands as a newcomer runs them: `broker dev` driven through the whole flow with the real
grpcurl (by reflection), `broker serve`'s start-up checks, `broker template`, SIGTERM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.auth import hash_token
from broker.template import template_body
from tests.processes import BIN, BrokerProcess

GRPCURL = str(BIN / "grpcurl")
SERVICE = "broker.v1.CredentialBroker"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=60, env=env or os.environ.copy(), check=False
    )


class Dev(BrokerProcess):
    """`broker dev` in a subprocess, with what it printed so far."""

    def __init__(self, tmp_path: Path) -> None:
        env = os.environ | {
            "BROKER_LISTEN": "127.0.0.1:0",
            "BROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'dev.db'}",
            "BROKER_LOG_LEVEL": "DEBUG",
            "BROKER_METRICS_LISTEN": "127.0.0.1:0",
        }
        super().__init__(["dev", "--aws-port", "0"], env, tmp_path / "dev.log")
        self.wait_for(r"DEVELOPMENT MODE[^=]*=====+\n")
        self.address = self.wait_for(r"loopback\): +(\S+)")[1]
        self.aws = self.wait_for(r"LOCAL EMULATOR.* at (http://\S+)")[1]

    def grpcurl(self, method: str, body: dict[str, str] | None = None) -> dict[str, object]:
        args = [GRPCURL, "-plaintext"]
        if body is not None:
            args += ["-d", json.dumps(body)]
        done = run(*args, self.address, method)
        assert done.returncode == 0, done.stderr
        parsed: dict[str, object] = json.loads(done.stdout)
        return parsed


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    started = Dev(tmp_path)
    yield started
    started.close()


def test_dev_mode_walks_the_whole_flow_with_grpcurl(dev: Dev) -> None:
    assert "LOCAL EMULATOR" in dev.text()
    assert "Nothing reaches real AWS" in dev.text()
    listed = run(GRPCURL, "-plaintext", dev.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {SERVICE, "grpc.health.v1.Health"}
    described = run(GRPCURL, "-plaintext", dev.address, "describe", SERVICE)
    assert "rpc WatchCredentials" in described.stdout

    created = dev.grpcurl(f"{SERVICE}/CreateConnection", {"tenant_id": "acme"})["connection"]
    assert isinstance(created, dict)
    stack = run(
        str(BIN / "broker"), "dev-stack", created["quick_create_url"], "--aws-endpoint", dev.aws
    )
    assert stack.returncode == 0, stack.stderr
    role_arn = stack.stdout.strip()
    verified = dev.grpcurl(f"{SERVICE}/VerifyRole", {"tenant_id": "acme", "role_arn": role_arn})[
        "connection"
    ]
    assert isinstance(verified, dict)
    assert verified["status"] == "CONNECTION_STATUS_ACTIVE"
    issued = dev.grpcurl(f"{SERVICE}/IssueCredentials", {"tenant_id": "acme", "run_id": "r1"})
    credentials = issued["credentials"]
    assert isinstance(credentials, dict)
    assert credentials["access_key_id"].startswith("ASIA")
    health = dev.grpcurl("grpc.health.v1.Health/Check", {"service": SERVICE})
    assert health == {"status": "SERVING"}

    assert dev.stop() == 0
    log = dev.text()
    assert "draining" in log
    assert "stopped" in log
    # Secret hygiene, at DEBUG: nothing issued reaches the log or the database.
    for secret in (credentials["secret_access_key"], credentials["session_token"]):
        assert secret not in log
        assert secret.encode() not in (Path(dev.log.parent) / "dev.db").read_bytes()


def test_serve_refuses_a_wrong_setting_naming_it() -> None:
    env = os.environ | {"BROKER_SESSION_DURATION": "60", "BROKER_REFRESH_MARGIN": "soon"}
    done = run(str(BIN / "broker"), "serve", env=env)
    assert done.returncode == 2
    assert "BROKER_SESSION_DURATION='60'" in done.stderr
    assert "greater than or equal to 900" in done.stderr
    assert "BROKER_REFRESH_MARGIN='soon'" in done.stderr


def test_serve_on_a_public_address_without_authentication_is_stopped() -> None:
    env = os.environ | {"BROKER_LISTEN": "0.0.0.0:50051", "BROKER_TEMPLATE_URL": "https://x"}
    done = run(str(BIN / "broker"), "serve", env=env)
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0:50051 without caller authentication" in done.stderr
    assert "BROKER_TLS_CLIENT_CA_FILE" in done.stderr


def test_serve_requires_a_template_url() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    done = run(str(BIN / "broker"), "serve", env=env)
    assert done.returncode == 2
    assert "BROKER_TEMPLATE_URL is required" in done.stderr


def test_serve_help_lists_every_setting() -> None:
    done = run(str(BIN / "broker"), "serve", "--help")
    assert done.returncode == 0
    for name in (
        "LISTEN",
        "DATABASE_URL",
        "TRUSTED_PRINCIPAL_ARN",
        "TEMPLATE_URL",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
        "SESSION_DURATION",
        "REFRESH_MARGIN",
        "CACHE_MAX_ENTRIES",
        "SESSION_POLICY_ARNS",
    ):
        assert f"BROKER_{name}" in done.stdout


def test_template_command_prints_the_customer_template() -> None:
    principal = "arn:aws:iam::123456789012:role/platform/credential-broker"
    done = run(sys.executable, "-m", "broker", "template", "--trusted-principal-arn", principal)
    assert done.returncode == 0, done.stderr
    assert done.stdout == template_body(principal)
    assert f'AWS: "{principal}"' in done.stdout
    assert "sts:ExternalId" in done.stdout


def test_template_takes_the_principal_from_the_environment() -> None:
    principal = "arn:aws-cn:iam::123456789012:user/credential-broker"
    env = os.environ | {"BROKER_TRUSTED_PRINCIPAL_ARN": principal}
    done = run(str(BIN / "broker"), "template", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == template_body(principal)


def test_template_without_a_principal_says_how_to_give_one() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    for unset in (env, env | {"BROKER_TRUSTED_PRINCIPAL_ARN": ""}):
        done = run(str(BIN / "broker"), "template", env=unset)
        assert done.returncode == 2
        assert done.stdout == ""
        (line,) = done.stderr.splitlines()
        assert "--trusted-principal-arn" in line
        assert "BROKER_TRUSTED_PRINCIPAL_ARN" in line


@pytest.mark.parametrize(
    ("args", "principal", "named"),
    [
        (["--trusted-principal-arn", "*"], None, "--trusted-principal-arn"),
        (["--trusted-principal-arn", "arn:aws:iam::123456789012:root"], None, "--trusted"),
        (["--trusted-principal-arn", "arn:aws:iam::123456789012:role/*"], None, "--trusted"),
        ([], "arn:aws:iam::*:role/credential-broker", "BROKER_TRUSTED_PRINCIPAL_ARN"),
        ([], "arn:aws:iam::123456789012:group/admins", "BROKER_TRUSTED_PRINCIPAL_ARN"),
    ],
)
def test_template_refuses_a_principal_customers_must_not_trust(
    args: list[str], principal: str | None, named: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env |= {"BROKER_TRUSTED_PRINCIPAL_ARN": principal} if principal else {}
    done = run(str(BIN / "broker"), "template", *args, env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert named in line
    assert "is not an IAM role or user ARN" in line
    assert "Traceback" not in done.stderr


def test_migrate_brings_the_schema_up_to_date(tmp_path: Path) -> None:
    env = os.environ | {"BROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}"}
    first = run(str(BIN / "broker"), "migrate", env=env)
    again = run(str(BIN / "broker"), "migrate", env=env)
    assert first.returncode == again.returncode == 0, first.stderr
    assert "schema up to date" in again.stdout
    assert (tmp_path / "m.db").exists()


def test_serve_on_a_taken_port_says_which_setting() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        for setting in ("BROKER_LISTEN", "BROKER_METRICS_LISTEN", "BROKER_HEALTH_LISTEN"):
            env = os.environ | {
                "BROKER_LISTEN": "127.0.0.1:0",
                "BROKER_METRICS_LISTEN": "127.0.0.1:0",
                "BROKER_TEMPLATE_URL": "https://x",
                "BROKER_TRUSTED_PRINCIPAL_ARN": "arn:aws:iam::111111111111:role/broker",
                "BROKER_DATABASE_URL": "sqlite:///:memory:",
                setting: address,
            }
            done = run(str(BIN / "broker"), "serve", env=env)
            assert done.returncode == 2, (setting, done.stderr)
            assert f"{setting}={address}: cannot listen there" in done.stderr


@pytest.mark.parametrize(("setting", "loop"), [(None, "uvloop"), ("asyncio", "asyncio")])
def test_serve_runs_on_the_event_loop_set(tmp_path: Path, setting: str | None, loop: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BROKER_EVENT_LOOP"}
    env |= {"BROKER_EVENT_LOOP": setting} if setting else {}
    env |= {
        "BROKER_LISTEN": "127.0.0.1:0",
        "BROKER_METRICS_LISTEN": "127.0.0.1:0",
        "BROKER_TEMPLATE_URL": "https://x",
        "BROKER_TRUSTED_PRINCIPAL_ARN": "arn:aws:iam::111111111111:role/broker",
        "BROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'uv.db'}",
        "BROKER_DRAIN_SECONDS": "0",
    }
    broker = BrokerProcess(["serve"], env, tmp_path / "serve.log")
    try:
        port = broker.wait_serving()
        assert f'"event_loop": "{loop}"' in broker.text()
        done = run(GRPCURL, "-plaintext", f"127.0.0.1:{port}", "grpc.health.v1.Health/Check")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"status": "SERVING"}
        assert broker.stop() == 0
    finally:
        broker.close()


def test_token_prints_the_token_its_hash_and_how_the_policy_names_it() -> None:
    made = run(str(BIN / "broker"), "token", "launcher")
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    token = lines[0].rsplit(" ", 1)[1]
    assert lines[1] == f"BROKER_TOKEN_HASHES entry: launcher={hash_token(token)}"
    assert lines[2] == "BROKER_POLICY names this caller: token:launcher"
    refused = run(str(BIN / "broker"), "token", "launcher=credentials")
    assert refused.returncode == 2
    assert len(refused.stderr.splitlines()) == 1
    assert "not a token name" in refused.stderr
