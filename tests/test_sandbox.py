"""Credentials that never expire mid-run, in a sandbox that has nothing else: a real boto3
program (and the AWS CLI) in a subprocess whose environment holds only what `broker
sandbox-endpoint` printed, eval'd by a shell (or only the config file `broker config-profile`
wrote), keeps calling AWS (the emulator) across several renewals without a restart or an error;
and the other delivery formats, as real SDKs read them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.auth import hash_token, new_token
from broker.client import BrokerClient
from broker.delivery import RunCredentials
from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running, connect, settings_for, start_broker
from tests.processes import BIN

LIFETIME = 4.0  # seconds each credential lives here, so the program sees several renewals
REGION = "eu-west-2"  # the tenant's, not the broker's default: the sandbox learns it from us
BASH = shutil.which("bash") or "/bin/bash"
# Runs "$@" with exactly the variables in the file "$0" added: what a launcher does with
# `set -a; eval "$(broker sandbox-endpoint ...)"`.
EVAL_THEN_RUN = 'set -a; eval "$(< "$0")"; set +a; exec "$@"'
PROGRAM = """
import json, os, sys, time
import boto3
session = boto3.Session()
sts = session.client("sts")
calls, errors, keys, arns = 0, [], [], set()
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        arns.add(sts.get_caller_identity()["Arn"])
        key = session.get_credentials().get_frozen_credentials().access_key
        if not keys or keys[-1] != key:
            keys.append(key)
    except Exception as error:
        errors.append(repr(error))
    calls += 1
    time.sleep(0.2)
print(json.dumps({
    "calls": calls, "errors": errors, "keys": keys, "arns": sorted(arns),
    "region": session.region_name, "method": session.get_credentials().method,
    "aws_variables": sorted(name for name in os.environ if name.startswith("AWS_")),
}))
"""


def python(*args: str) -> list[str]:
    """The command that runs PROGRAM (this Python by its path: the sandbox's PATH is empty)."""
    return [sys.executable, "-c", PROGRAM, *args]


def sdk_env(**extra: str) -> dict[str, str]:
    """An environment with no AWS credentials of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BROKER_"))}
    return env | {"AWS_EC2_METADATA_DISABLED": "true", **extra}


def bare_env(tmp_path: Path, local_aws: LocalAws) -> dict[str, str]:
    """A sandbox's whole environment, built from nothing: PATH and HOME of empty folders, and
    the emulator's STS endpoint (test plumbing: real AWS needs no such variable)."""
    home, path = tmp_path / "sandbox-home", tmp_path / "sandbox-bin"
    home.mkdir(exist_ok=True)
    path.mkdir(exist_ok=True)
    return {"PATH": str(path), "HOME": str(home), "AWS_ENDPOINT_URL_STS": local_aws.endpoint_url}


async def connect_in(running: Running, local_aws: LocalAws, tenant: str, region: str) -> str:
    """`connect`, with the connection in `region`; returns the role's assumed-role ARN prefix."""
    await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id=tenant, region=region))
    connection = await connect(running, local_aws, tenant)
    assert connection.region == region
    role_name = connection.role_arn.rsplit("/", 1)[1]
    return f"arn:aws:sts::{connection.account_id}:assumed-role/{role_name}"


@contextlib.asynccontextmanager
async def running_process(
    process: asyncio.subprocess.Process,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`process`, killed if it is still running when the block ends (a failed test)."""
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def run(
    argv: Sequence[str], env: dict[str, str], cwd: Path | None = None, within: float = 60
) -> tuple[int, str, str]:
    """Run `argv` to its end (the broker under test keeps serving meanwhile)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    async with running_process(process):
        out, err = await asyncio.wait_for(process.communicate(), timeout=within)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_long_running_program_renews_through_the_endpoint(
    local_aws: LocalAws, tenant: str, template_url: str, broker_identity: Identity, tmp_path: Path
) -> None:
    settings = settings_for(f"sqlite:///{tmp_path / 'b.db'}", local_aws, template_url)
    async with start_broker(settings | {"refresh_margin": 60}, broker_identity) as running:
        assumed_role = await connect_in(running, local_aws, tenant, REGION)
        local_aws.sts.session_lifetime = LIFETIME
        endpoint = await asyncio.create_subprocess_exec(
            str(BIN / "broker"),
            "sandbox-endpoint",
            "--broker",
            running.address,
            "--tenant",
            tenant,
            "--run",
            "long-run",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": os.defpath, "HOME": str(tmp_path)},
        )
        async with running_process(endpoint):
            assert endpoint.stdout is not None
            assert endpoint.stderr is not None
            # It prints, then closes its output: read to the end.
            printed = (await asyncio.wait_for(endpoint.stdout.read(), timeout=20)).decode()
            variables = dict(line.partition("=")[::2] for line in printed.splitlines())
            assert set(variables) == {
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_AUTHORIZATION_TOKEN",
                "AWS_REGION",
                "AWS_DEFAULT_REGION",
            }
            assert variables["AWS_REGION"] == variables["AWS_DEFAULT_REGION"] == REGION
            url = variables["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
            assert url.startswith("http://127.0.0.1:")
            for wrong in ("", "not-the-token"):
                with pytest.raises(urllib.error.HTTPError) as refused:
                    await asyncio.to_thread(
                        urllib.request.urlopen,
                        urllib.request.Request(url, headers={"Authorization": wrong}),
                        None,
                        5,
                    )
                assert refused.value.code == 401
                refused.value.close()

            (tmp_path / "printed").write_text(printed)
            code, out, err = await run(
                [BASH, "-c", EVAL_THEN_RUN, str(tmp_path / "printed"), *python(str(LIFETIME * 3))],
                bare_env(tmp_path, local_aws),
            )
            assert code == 0, err
            seen: dict[str, Any] = json.loads(out)

            await running.stub.ReleaseCredentials(
                pb.ReleaseCredentialsRequest(tenant_id=tenant, run_id="long-run")
            )
            assert await asyncio.wait_for(endpoint.wait(), timeout=10) == 0, "ends with the run"
            assert await endpoint.stderr.read() == b"", "a clean end says nothing"
    assert seen["errors"] == []
    assert seen["calls"] >= 30
    assert len(seen["keys"]) >= 3, f"renewals the program saw: {seen['keys']}"
    assert seen["arns"] == [f"{assumed_role}/long-run"]
    assert seen["region"] == REGION
    assert seen["method"] == "container-role"
    assert seen["aws_variables"] == sorted([*variables, "AWS_ENDPOINT_URL_STS"])


async def test_a_long_running_program_renews_through_credential_process(
    local_aws: LocalAws, tenant: str, template_url: str, broker_identity: Identity, tmp_path: Path
) -> None:
    """The AWS config `broker config-profile` prints, written to the sandbox's ~/.aws/config
    as it is, is all the program has: its credential_process runs `broker credential-process`
    (by absolute path, from another folder, with a token file whose path has a space)."""
    ui, launcher = new_token(), new_token()
    settings = settings_for(f"sqlite:///{tmp_path / 'b.db'}", local_aws, template_url) | {
        "refresh_margin": 60,
        "token_hashes": f"ui={hash_token(ui)},launcher={hash_token(launcher)}",
        "policy": "token:ui=connections; token:launcher=credentials",
    }
    secrets = tmp_path / "launcher secrets"
    secrets.mkdir()
    (secrets / "token").write_text(launcher + "\n")
    async with start_broker(settings, broker_identity) as running:
        as_ui = (("authorization", f"Bearer {ui}"),)
        created = await running.stub.CreateConnection(
            pb.CreateConnectionRequest(tenant_id=tenant, region=REGION), metadata=as_ui
        )
        role_arn = local_aws.create_customer_stack(created.connection.quick_create_url)
        verified = await running.stub.VerifyRole(
            pb.VerifyRoleRequest(tenant_id=tenant, role_arn=role_arn), metadata=as_ui
        )
        account, role_name = verified.connection.account_id, role_arn.rsplit("/", 1)[1]
        local_aws.sts.session_lifetime = LIFETIME
        code, config, err = await run(
            [
                *(str(BIN / "broker"), "config-profile", "--profile", "default"),
                *("--broker", running.address, "--tenant", tenant, "--run", "long-run"),
                *("--token-file", "launcher secrets/token"),  # relative to its folder
            ],
            {"PATH": os.defpath, "HOME": str(tmp_path)},
            cwd=tmp_path,
        )
        assert (code, err) == (0, ""), err
        lines = config.splitlines()
        assert lines[0] == "[default]"
        assert lines[1].startswith(f"credential_process = {BIN / 'broker'} credential-process ")
        assert f"--token-file '{secrets / 'token'}'" in lines[1], "absolute, and quoted"
        assert lines[2:] == [f"region = {REGION}"]
        assert launcher not in config

        env = bare_env(tmp_path, local_aws)
        (Path(env["HOME"]) / ".aws").mkdir()
        (Path(env["HOME"]) / ".aws" / "config").write_text(config)
        code, out, err = await run(python(str(LIFETIME * 2.5)), env, cwd=Path(env["PATH"]))
        assert code == 0, err
        seen: dict[str, Any] = json.loads(out)
    assert seen["errors"] == []
    assert seen["calls"] >= 5
    assert len(seen["keys"]) >= 3, f"renewals the program saw: {seen['keys']}"
    assert seen["arns"] == [f"arn:aws:sts::{account}:assumed-role/{role_name}/long-run"]
    assert seen["region"] == REGION
    assert seen["method"] == "custom-process"
    assert seen["aws_variables"] == ["AWS_ENDPOINT_URL_STS"]


async def test_the_aws_cli_in_a_bare_sandbox(
    local_aws: LocalAws, tenant: str, template_url: str, broker_identity: Identity, tmp_path: Path
) -> None:
    """The AWS CLI, through the endpoint started as the README shows (`eval "$(broker
    sandbox-endpoint ... &)"`, which returns while the endpoint serves on), and through a
    config profile."""
    settings = settings_for(f"sqlite:///{tmp_path / 'b.db'}", local_aws, template_url)
    async with start_broker(settings, broker_identity) as running:
        assumed_role = await connect_in(running, local_aws, tenant, REGION)
        local_aws.sts.session_lifetime = 30  # ends the endpoint soon after the broker if left
        flags = ["--broker", running.address, "--tenant", tenant, "--connect-timeout", "2"]
        aws = [str(BIN / "aws"), "sts", "get-caller-identity", "--output", "json"]
        log = tmp_path / "endpoint.log"
        script = (
            f'set -a; eval "$("$0" sandbox-endpoint "$@" 2>{shlex.quote(str(log))} &)"; set +a; '
            f'echo "region=$AWS_REGION" >&2; exec {shlex.join(aws)}'
        )
        code, out, err = await run(
            [BASH, "-c", script, str(BIN / "broker"), *flags, "--run", "cli-endpoint"],
            bare_env(tmp_path, local_aws),
            within=30,
        )
        assert code == 0, err + log.read_text()
        assert json.loads(out)["Arn"] == f"{assumed_role}/cli-endpoint"
        assert f"region={REGION}" in err.splitlines()
        await running.stub.ReleaseCredentials(
            pb.ReleaseCredentialsRequest(tenant_id=tenant, run_id="cli-endpoint")
        )

        code, config, err = await run(
            [str(BIN / "broker"), "config-profile", "--profile", "run", *flags, "--run", "cli-cp"],
            {"PATH": os.defpath, "HOME": str(tmp_path)},
        )
        assert code == 0, err
        env = bare_env(tmp_path, local_aws)
        (Path(env["HOME"]) / ".aws").mkdir()
        (Path(env["HOME"]) / ".aws" / "config").write_text(config)
        code, out, err = await run([*aws, "--profile", "run"], env, within=30)
        assert code == 0, err
        assert json.loads(out)["Arn"] == f"{assumed_role}/cli-cp"


def test_delivery_formats_are_what_sdks_read(
    local_aws: LocalAws, broker_identity: Identity, tmp_path: Path
) -> None:
    """credential_process output, read by a real botocore through an AWS config file."""
    sts = local_aws.client(
        "sts",
        aws_access_key_id=broker_identity.access_key_id,
        aws_secret_access_key=broker_identity.secret_access_key,
    )
    assumed = sts.get_caller_identity()  # any valid emulator identity will do here
    credentials = RunCredentials(
        access_key_id=broker_identity.access_key_id,
        secret_access_key=broker_identity.secret_access_key,
        session_token="",
        expiration=datetime.now(UTC) + timedelta(hours=1),
        region="eu-west-1",
        assumed_role_arn=assumed["Arn"],
    )
    output = tmp_path / "credentials.json"
    output.write_text(credentials.credential_process())
    config = tmp_path / "config"
    config.write_text(f"[default]\ncredential_process = cat {output}\nregion = eu-west-1\n")
    probe = (
        "import boto3; s = boto3.Session(); "
        "print(s.get_credentials().method, s.client('sts').get_caller_identity()['Arn'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=sdk_env(AWS_CONFIG_FILE=str(config), AWS_ENDPOINT_URL=local_aws.endpoint_url),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["custom-process", assumed["Arn"]]
    env = credentials.env()
    assert env["AWS_ACCESS_KEY_ID"] == credentials.access_key_id
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "eu-west-1"
    container = credentials.container_credentials()
    assert set(container) == {"AccessKeyId", "SecretAccessKey", "Token", "Expiration", "RoleArn"}
    assert container["Expiration"].endswith("Z")
    assert broker_identity.secret_access_key not in repr(credentials)


async def test_the_client_watch_reconnects_after_a_replica_goes_away(
    local_aws: LocalAws, tenant: str, template_url: str, broker_identity: Identity, tmp_path: Path
) -> None:
    """A broker restarted under a watching launcher: the client's watch carries on."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = settings_for(f"sqlite:///{tmp_path / 'b.db'}", local_aws, template_url) | {
        "listen": f"127.0.0.1:{port}"
    }
    async with start_broker(settings, broker_identity) as first:
        await connect(first, local_aws, tenant)
        client = BrokerClient(f"127.0.0.1:{port}", reconnect_backoff=(0.05, 0.5))
        watch = client.watch_credentials(tenant, "r")
        before = await anext(watch)
        await first.broker.stop(grace=0)
    async with start_broker(settings, broker_identity):
        after = await asyncio.wait_for(anext(watch), timeout=15)
        assert after.access_key_id != before.access_key_id  # a new replica, a new session
        await client.release_credentials(tenant, "r")
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(watch), timeout=10)
        await client.close()
