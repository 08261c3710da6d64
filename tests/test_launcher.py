"""What a launcher sees when a run cannot have credentials: through the real CLI, each of
`broker sandbox-endpoint | credential-process | config-profile` exits with the documented code
(0 released, 2 usage, 3 refused for good, 4 unavailable) and says why in one line on stderr,
never a traceback; an unreachable broker is given up on after --connect-timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.auth import hash_token, new_token
from broker.emulator import Identity, LocalAws
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running, connect, settings_for, start_broker
from tests.processes import BIN
from tests.test_sandbox import running_process

COMMANDS = ["sandbox-endpoint", "credential-process", "config-profile"]
USAGE, REFUSED, UNAVAILABLE = 2, 3, 4


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str
    seconds: float

    def line(self) -> str:
        """The one line on stderr (fails unless there is exactly one)."""
        assert "Traceback" not in self.stderr, self.stderr
        (line,) = self.stderr.splitlines()
        return line


def launcher_args(command: str, broker: str, tenant: str, run: str) -> list[str]:
    profile = ["--profile", "sandbox"] if command == "config-profile" else []
    return [command, "--broker", broker, "--tenant", tenant, "--run", run, *profile]


async def spawn(*args: str, home: Path) -> asyncio.subprocess.Process:
    """`broker ARGS`, from an environment with nothing of ours in it."""
    return await asyncio.create_subprocess_exec(
        str(BIN / "broker"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.defpath, "HOME": str(home)},
    )


async def broker_cli(*args: str, home: Path, within: float = 30) -> Done:
    """`broker ARGS` to its end."""
    started = time.monotonic()
    async with running_process(await spawn(*args, home=home)) as process:
        out, err = await asyncio.wait_for(process.communicate(), timeout=within)
    assert process.returncode is not None
    return Done(process.returncode, out.decode(), err.decode(), time.monotonic() - started)


@contextlib.asynccontextmanager
async def sqlite_broker(
    local_aws: LocalAws, template_url: str, identity: Identity, tmp_path: Path, **extra: str
) -> AsyncIterator[Running]:
    settings = settings_for(f"sqlite:///{tmp_path / 'b.db'}", local_aws, template_url)
    async with start_broker(settings | extra, identity) as running:
        yield running


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port that accepts connections and never says a word (a hung broker)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_tenant_not_connected_yet_or_any_more_is_refused_at_once(
    local_aws: LocalAws, template_url: str, broker_identity: Identity, tmp_path: Path
) -> None:
    async with sqlite_broker(local_aws, template_url, broker_identity, tmp_path) as running:
        await running.stub.CreateConnection(pb.CreateConnectionRequest(tenant_id="pending"))
        await connect(running, local_aws, "gone")
        await running.stub.Disconnect(pb.DisconnectRequest(tenant_id="gone"))
        for tenant, status in (("pending", "PENDING"), ("gone", "DISCONNECTED")):
            for command in COMMANDS:
                done = await broker_cli(
                    *launcher_args(command, running.address, tenant, "run-1"), home=tmp_path
                )
                assert done.code == REFUSED, (command, done)
                assert done.stdout == ""
                assert done.line().startswith(
                    f"broker: the tenant is not connected: the connection of tenant "
                    f"{tenant!r} is {status}, not ACTIVE: "
                ), command
                assert done.seconds < 8, "refused for good: no retry budget spent"


async def test_an_unknown_tenant_is_refused(
    local_aws: LocalAws, template_url: str, broker_identity: Identity, tmp_path: Path
) -> None:
    async with sqlite_broker(local_aws, template_url, broker_identity, tmp_path) as running:
        for command in COMMANDS:
            done = await broker_cli(
                *launcher_args(command, running.address, "nobody", "run-1"), home=tmp_path
            )
            assert done.code == REFUSED, (command, done)
            assert done.stdout == ""
            assert done.line() == (
                "broker: unknown tenant: no connection for tenant 'nobody'; "
                "CreateConnection starts one"
            )


async def test_a_malformed_tenant_is_a_usage_error(
    local_aws: LocalAws, template_url: str, broker_identity: Identity, tmp_path: Path
) -> None:
    async with sqlite_broker(local_aws, template_url, broker_identity, tmp_path) as running:
        for command in COMMANDS:
            done = await broker_cli(
                *launcher_args(command, running.address, "no spaces", "run-1"), home=tmp_path
            )
            assert done.code == USAGE, (command, done)
            assert done.line().startswith("broker: invalid request: tenant_id: must be ")


async def test_the_endpoint_exits_0_when_the_run_is_released_and_3_when_the_tenant_goes(
    local_aws: LocalAws, template_url: str, broker_identity: Identity, tmp_path: Path
) -> None:
    async with sqlite_broker(local_aws, template_url, broker_identity, tmp_path) as running:
        await connect(running, local_aws, "acme")
        outcomes = {}
        for run in ("released", "cut-off"):
            args = launcher_args("sandbox-endpoint", running.address, "acme", run)
            async with running_process(
                await spawn(*args, "--format", "json", home=tmp_path)
            ) as endpoint:
                assert endpoint.stdout is not None
                assert endpoint.stderr is not None
                printed = await asyncio.wait_for(endpoint.stdout.read(), timeout=20)  # then EOF
                if run == "released":
                    await running.stub.ReleaseCredentials(
                        pb.ReleaseCredentialsRequest(tenant_id="acme", run_id=run)
                    )
                else:
                    await running.stub.Disconnect(pb.DisconnectRequest(tenant_id="acme"))
                code = await asyncio.wait_for(endpoint.wait(), timeout=10)
                said = await endpoint.stderr.read()
            outcomes[run] = Done(code, printed.decode(), said.decode(), 0)
    released, cut_off = outcomes["released"], outcomes["cut-off"]
    assert (released.code, released.stderr) == (0, ""), released
    assert re.fullmatch(r'\{"AWS_CONTAINER_CREDENTIALS_FULL_URI":"[^"]+",.*\}\n', released.stdout)
    assert cut_off.code == REFUSED, cut_off
    assert cut_off.line() == "broker: the tenant's connection ended: tenant 'acme' was disconnected"


@pytest.mark.parametrize("broker", ["refusing", "silent"])
async def test_an_unreachable_broker_is_given_up_on_after_the_connect_timeout(
    broker: str, tmp_path: Path
) -> None:
    with silent_listener() as silent:
        port = closed_port() if broker == "refusing" else silent
        runs = [
            broker_cli(
                *launcher_args(command, f"127.0.0.1:{port}", "acme", "run-1"),
                "--connect-timeout",
                "2",
                home=tmp_path,
            )
            for command in COMMANDS
        ]
        done = await asyncio.gather(*runs)
    for command, each in zip(COMMANDS, done, strict=True):
        assert each.code == UNAVAILABLE, (command, each)
        assert each.stdout == ""
        assert each.line().startswith(
            f"broker: the broker is unavailable: no answer from 127.0.0.1:{port} within 2."
        ), command
        if broker == "refusing":
            assert "Connection refused" in each.line()
        assert 2 <= each.seconds < 8, (command, each.seconds)


async def test_a_caller_without_the_right_token_is_refused(
    local_aws: LocalAws, template_url: str, broker_identity: Identity, tmp_path: Path
) -> None:
    launcher = new_token()
    (tmp_path / "right").write_text(launcher)
    (tmp_path / "wrong").write_text(new_token())
    async with sqlite_broker(
        local_aws,
        template_url,
        broker_identity,
        tmp_path,
        token_hashes=f"launcher={hash_token(launcher)}",
        policy="token:launcher=credentials@acme",
    ) as running:
        for command in COMMANDS:
            for token, tenant in (("wrong", "acme"), ("right", "globex")):
                done = await broker_cli(
                    *launcher_args(command, running.address, tenant, "run-1"),
                    "--token-file",
                    str(tmp_path / token),
                    home=tmp_path,
                )
                assert done.code == REFUSED, (command, token, done)
                assert done.line().startswith("broker: permission denied: "), done
                assert launcher not in done.stdout + done.stderr
