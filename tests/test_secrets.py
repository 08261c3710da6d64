"""No issued secret key or session token appears in a log line (at DEBUG), an error message,
or the database file."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import grpc
import pytest

from broker.emulator import LocalAws
from broker.logs import FieldsFormatter
from broker.models import Credentials
from broker.v1 import broker_pb2 as pb
from tests.conftest import Running, captured_logs, connect, metrics_text, stored_bytes


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    """Everything every logger writes at DEBUG, formatted as the broker formats it."""
    with captured_logs(
        FieldsFormatter("%(levelname)s %(name)s %(message)s"), logging.DEBUG
    ) as sink:
        yield sink


async def test_secrets_stay_out_of_logs_errors_and_storage(
    debug_log: io.StringIO, running: Running, local_aws: LocalAws, tenant: str
) -> None:
    """DEBUG is on before the broker starts, as an operator debugging it would set it."""
    await connect(running, local_aws, tenant)
    issued: list[pb.Credentials] = []
    for run in ("a", "b"):
        answer = await running.stub.IssueCredentials(
            pb.IssueCredentialsRequest(tenant_id=tenant, run_id=run)
        )
        issued.append(answer.credentials)
    stream = running.stub.WatchCredentials(pb.WatchCredentialsRequest(tenant_id=tenant, run_id="c"))
    issued.append((await stream.read()).credentials)
    errors = []
    await running.stub.Disconnect(pb.DisconnectRequest(tenant_id=tenant))
    try:
        await stream.read()
    except grpc.aio.AioRpcError as ended:
        errors.append(f"{ended.details()} {ended.debug_error_string()}")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.IssueCredentials(
            pb.IssueCredentialsRequest(tenant_id=tenant, run_id="a")
        )
    errors.append(f"{refused.value.details()} {refused.value.debug_error_string()}")

    logged = debug_log.getvalue()
    metrics_output = (await metrics_text(running)).encode()
    assert b"broker_rpcs_total" in metrics_output
    assert "method=IssueCredentials" in logged, "the log was captured"
    assert "DEBUG" in logged
    database = await stored_bytes(running.database_url)
    assert tenant.encode() in database, "the store's contents were read"
    for credentials in issued:
        for secret in (credentials.secret_access_key, credentials.session_token):
            assert secret
            assert secret not in logged
            assert secret.encode() not in database
            assert secret.encode() not in metrics_output
            assert all(secret not in error for error in errors)


def test_credentials_never_show_their_secrets_in_repr() -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    credentials = Credentials(
        "ASIAEXAMPLE", "very-secret-key", "very-secret-token", now, "arn", now
    )
    shown = repr(credentials) + str(credentials)
    assert "ASIAEXAMPLE" in shown
    assert "very-secret" not in shown


def test_messages_holding_credentials_print_redacted() -> None:
    from broker import wire

    credentials = pb.Credentials(
        access_key_id="ASIAEXAMPLE", secret_access_key="very-secret-key", session_token="tok3n"
    )
    for message in (
        credentials,
        pb.IssueCredentialsResponse(credentials=credentials),
        pb.WatchCredentialsResponse(credentials=credentials),
    ):
        assert isinstance(message, wire.HOLDS_CREDENTIALS)
        shown = f"{message} {message!r} {[message]}"
        assert "very-secret-key" not in shown
        assert "tok3n" not in shown
        assert "redacted" in shown
    assert (
        pb.IssueCredentialsResponse.FromString(
            pb.IssueCredentialsResponse(credentials=credentials).SerializeToString()
        ).credentials.secret_access_key
        == "very-secret-key"
    ), "the wire still carries them"
