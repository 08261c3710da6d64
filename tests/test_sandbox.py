"""Credentials that never expire mid-run: a real boto3 program in a subprocess keeps calling AWS
(the emulator) through `broker sandbox-endpoint` across several renewals, without a restart or
an error; and the other delivery formats, as real SDKs read them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.client import BrokerClient
from broker.delivery import RunCredentials
from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from tests.conftest import connect, settings_for, start_broker
from tests.processes import BIN

LIFETIME = 4.0  # seconds each credential lives here, so the program sees several renewals
PROGRAM = """
import json, sys, time
import boto3
session = boto3.Session(region_name="us-east-1")
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
print(json.dumps({"calls": calls, "errors": errors, "keys": keys, "arns": sorted(arns)}))
"""


def sdk_env(**extra: str) -> dict[str, str]:
    """An environment with no AWS credentials of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BROKER_"))}
    return env | {"AWS_EC2_METADATA_DISABLED": "true", **extra}


async def test_a_long_running_program_renews_through_the_endpoint(
    local_aws: LocalAws, tenant: str, template_url: str, broker_identity: Identity, tmp_path: Path
) -> None:
    settings = settings_for(f"sqlite:///{tmp_path / 'b.db'}", local_aws, template_url)
    async with start_broker(settings | {"refresh_margin": 60}, broker_identity) as running:
        connection = await connect(running, local_aws, tenant)
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
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert endpoint.stdout is not None
        variables = {}
        for _ in range(2):
            line = (await asyncio.wait_for(endpoint.stdout.readline(), timeout=20)).decode()
            name, _, value = line.strip().partition("=")
            variables[name] = value
        assert set(variables) == {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        }
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

        program = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            PROGRAM,
            str(LIFETIME * 3),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=sdk_env(AWS_ENDPOINT_URL=local_aws.endpoint_url, **variables),
        )
        out, err = await asyncio.wait_for(program.communicate(), timeout=60)
        assert program.returncode == 0, err.decode()
        seen: dict[str, Any] = json.loads(out)

        await running.stub.ReleaseCredentials(
            pb.ReleaseCredentialsRequest(tenant_id=tenant, run_id="long-run")
        )
        assert await asyncio.wait_for(endpoint.wait(), timeout=10) == 0, "ends with the run"
    assert seen["errors"] == []
    assert seen["calls"] >= 30
    assert len(seen["keys"]) >= 3, f"renewals the program saw: {seen['keys']}"
    role_name = connection.role_arn.rsplit("/", 1)[1]
    assert seen["arns"] == [
        f"arn:aws:sts::{connection.account_id}:assumed-role/{role_name}/long-run"
    ]


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
