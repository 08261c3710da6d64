"""The log against a hostile caller, through the real server: whatever a caller sends, with or
without a token, each call adds at most a fixed number of bytes to the log, no line it can
forge or recolour, and none of its metadata (a bearer token) in gRPC's own log."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.emulator import Identity, LocalAws
from broker.logs import FieldsFormatter, JsonFormatter
from broker.v1 import broker_pb2 as pb
from broker.v1 import broker_pb2_grpc
from tests.certs import Authority
from tests.conftest import Running, captured_logs, settings_for, start_broker

CALLS = 50
PER_CALL = 1024  # bytes of log one call may add, at most, whatever it sends
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"  # what logs.configure uses
# What a line must never carry raw: line ends (and what splitlines() takes for one), ESC, and
# the other C0 and C1 controls, DEL, and the bidi overrides.
RAW = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# One chunk of a hostile field: a forged record after a newline, CR, terminal escapes (clear
# screen, set the window title), DEL, C1, unicode line separator, bidi override, quotes.
CHUNK = (
    "\n2030-01-01 00:00:00,000 INFO broker.service rpc method=IssueCredentials code=OK\r"
    '{"level": "INFO", "message": "rpc"}\x1b[2J\x1b]0;owned\x07\x7f\x85\u2028\u202e💥\\"\' '
)
TENANT = CHUNK * (28_000 // len(CHUNK.encode()))  # with RUN, just under the 64 KB frame limit
RUN = "\\" * 27_000  # what grows most by escaping: a backslash doubled, and again in JSON
REQUEST_ID = "x" * 2000 + " code=OK method=Disconnect"  # what grpc's client lets through


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else FieldsFormatter(TEXT_FORMAT)


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


async def hostile_call(
    stub: Any, rpc: str, metadata: tuple[tuple[str, str], ...]
) -> grpc.StatusCode:
    """One call of `rpc` with TENANT and RUN as its fields; the status code it ended with."""
    fields = {"tenant_id": TENANT} | ({"run_id": RUN} if rpc != "GetConnection" else {})
    request = getattr(pb, f"{rpc}Request")(**fields)
    if rpc == "WatchCredentials":
        stream = stub.WatchCredentials(request, metadata=metadata, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stream.read()
    else:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await getattr(stub, rpc)(request, metadata=metadata, timeout=10)
    code: grpc.StatusCode = refused.value.code()
    return code


def check_bounded(log: str, fmt: str, code: str) -> list[str]:
    """The lines of `log`: CALLS lines of broker.service, one per call, each with `code`, of
    fixed size, escaped, and none forged."""
    assert len(log.encode()) <= CALLS * PER_CALL, f"{len(log.encode()) / CALLS:.0f} B per call"
    assert RAW.search(log) is None, "a raw control character reached the log"
    lines = log.split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert len(lines) == CALLS, "one line per call, none forged"
    for line in lines:
        assert len(line.encode()) <= PER_CALL
        if fmt == "json":
            entry = json.loads(line)
            assert (entry["logger"], entry["message"], entry["code"]) == (
                "broker.service",
                "rpc",
                code,
            )
            assert entry["tenant_chars"] == len(TENANT)
            assert entry["tenant_sha256"] == digest(TENANT)
            assert entry["tenant"].startswith("\\n2030-01-01 00:00:00,000 INFO")
            assert len(entry["tenant"]) <= 128
            if entry.get("run"):
                assert (entry["run_chars"], entry["run_sha256"]) == (len(RUN), digest(RUN))
                assert len(entry["run"]) <= 128
            assert entry["request_id_rejected"] is True
            assert entry["request_id_sent_sha256"] == digest(REQUEST_ID)
            assert "code=OK" not in entry["request_id"]
        else:
            assert re.match(
                rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} INFO broker\.service rpc "
                rf"method=\w+ code={code} tenant='\\\\n2030-01-01 ",
                line,
            ), line
            assert f" tenant_chars={len(TENANT)} tenant_sha256={digest(TENANT)} " in line
            assert " request_id_rejected=True " in line
    return lines


RPCS = ("IssueCredentials", "WatchCredentials", "GetConnection", "ReleaseCredentials")


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_a_caller_without_a_token_adds_a_fixed_size_line_per_call(
    guarded: tuple[Running, str], fmt: str
) -> None:
    running, token = guarded
    with captured_logs(formatter(fmt), logging.INFO) as sink:
        for i in range(CALLS):
            code = await hostile_call(
                running.stub, RPCS[i % len(RPCS)], (("x-request-id", REQUEST_ID),)
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED
        log = sink.getvalue()
    check_bounded(log, fmt, "UNAUTHENTICATED")

    ok = await running.stub.CreateConnection(
        pb.CreateConnectionRequest(tenant_id="acme"),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    assert ok.connection.status == pb.CONNECTION_STATUS_PENDING, "and it goes on serving"


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_a_caller_with_a_token_and_malformed_fields_adds_a_fixed_size_line(
    guarded: tuple[Running, str], fmt: str
) -> None:
    running, token = guarded
    metadata = (("authorization", f"Bearer {token}"), ("x-request-id", REQUEST_ID))
    with captured_logs(formatter(fmt), logging.INFO) as sink:
        for i in range(CALLS):
            code = await hostile_call(running.stub, RPCS[i % len(RPCS)], metadata)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        log = sink.getvalue()
    for line in check_bounded(log, fmt, "INVALID_ARGUMENT"):
        assert ('"caller": "token:ops"' if fmt == "json" else " caller=token:ops") in line


async def test_valid_fields_and_request_ids_are_logged_as_they_are(
    guarded: tuple[Running, str],
) -> None:
    running, token = guarded
    with captured_logs(JsonFormatter(), logging.INFO) as sink:
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.IssueCredentials(
                pb.IssueCredentialsRequest(tenant_id="acme-2", run_id="run:7/a=b+c@d"),
                metadata=(("authorization", f"Bearer {token}"), ("x-request-id", "req-1.2:3_4")),
            )
        # A run id may be 128 characters: shown whole, with no digest.
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.IssueCredentials(
                pb.IssueCredentialsRequest(tenant_id="acme-2", run_id="r" * 128),
                metadata=(("authorization", f"Bearer {token}"), ("x-request-id", "id with space")),
            )
    first, second = (json.loads(line) for line in sink.getvalue().splitlines())
    assert (first["tenant"], first["run"], first["request_id"]) == (
        "acme-2",
        "run:7/a=b+c@d",
        "req-1.2:3_4",
    )
    assert not {"tenant_chars", "run_chars", "request_id_rejected"} & set(first)
    assert second["run"] == "r" * 128
    assert "run_chars" not in second
    assert second["request_id_rejected"] is True
    assert second["request_id_sent_chars"] == len("id with space")
    assert " " not in second["request_id"]


async def test_a_caller_name_from_a_certificate_is_bounded(
    local_aws: LocalAws, template_url: str, broker_identity: Identity, tmp_path: Path
) -> None:
    ca = Authority("broker test CA")
    server = ca.issue("broker", dns=("localhost",), ips=("127.0.0.1",), server=True)
    long_name = "spiffe://example.org/" + "/".join(["segment-of-a-long-path"] * 20)
    client = ca.issue("long", uris=(long_name,))
    files = {"ca": ca.cert_pem, "cert": server.cert_pem, "key": server.key_pem}
    for name, content in files.items():
        (tmp_path / f"{name}.pem").write_bytes(content)
    settings = settings_for(f"sqlite:///{tmp_path / 'broker.db'}", local_aws, template_url) | {
        "tls_cert_file": str(tmp_path / "cert.pem"),
        "tls_key_file": str(tmp_path / "key.pem"),
        "tls_client_ca_file": str(tmp_path / "ca.pem"),
        "policy": f"{long_name}=connections",
    }
    credentials = grpc.ssl_channel_credentials(ca.cert_pem, client.key_pem, client.cert_pem)
    with captured_logs(JsonFormatter(), logging.INFO) as sink:
        async with (
            start_broker(settings, broker_identity) as running,
            grpc.aio.secure_channel(running.address, credentials) as channel,
        ):
            stub = broker_pb2_grpc.CredentialBrokerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetConnection(pb.GetConnectionRequest(tenant_id="acme"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND, "authenticated, allowed"
    (line,) = (
        json.loads(line)
        for line in sink.getvalue().splitlines()
        if json.loads(line)["logger"] == "broker.service"
    )
    assert line["caller"] == long_name[:128]
    assert (line["caller_chars"], line["caller_sha256"]) == (len(long_name), digest(long_name))


# Every character a line must not carry raw, and a printable one either side.
CONTROLS = "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, 0x202E, 0x2066]))


def test_formatters_write_every_control_character_escaped() -> None:
    """Whatever reaches a formatter, from any logger: one line per record (a traceback's lines
    indented after it), nothing raw; JSON gives the text back exactly."""
    try:
        raise ValueError(f"a message\n2030-01-01 forged{CONTROLS}")
    except ValueError as exc:
        error = exc
    record = logging.LogRecord(
        "any", logging.ERROR, __file__, 1, "said %s", (f"x{CONTROLS}y",), (ValueError, error, None)
    )
    record.bare = f"x{CONTROLS}y"
    record.spaced = f"x {CONTROLS} y"
    record.other = [CONTROLS]

    text = FieldsFormatter(TEXT_FORMAT).format(record)
    assert RAW.search(text) is None
    first, *traceback = text.split("\n")
    assert first.startswith(("20", "19"))
    assert " ERROR any said x\\x00\\x01" in first
    assert " bare=x\\x00" in first
    assert " spaced='x \\x00" in first
    assert traceback
    assert all(line.startswith("  ") for line in traceback)

    line = JsonFormatter().format(record)
    assert RAW.search(line) is None
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["message"], entry["bare"], entry["spaced"]) == (
        f"said x{CONTROLS}y",
        f"x{CONTROLS}y",
        f"x {CONTROLS} y",
    )


# gRPC's own clients refuse to send a metadata value that is not printable ASCII, so these
# calls go over a socket: HTTP/2 frames and HPACK literals, written by hand.


def _hpack_int(value: int) -> bytes:
    """An HPACK integer with a 7-bit prefix (RFC 7541 §5.1), the H bit clear."""
    if value < 127:
        return bytes([value])
    out, value = [127], value - 127
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack(">I", stream) + payload
    )


def raw_call(port: int, rpc: str, message: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    """One unary call with `headers` sent as they are; True once the server ended the stream."""
    block = b"".join(
        b"\x00" + _hpack_int(len(name)) + name + _hpack_int(len(value)) + value
        for name, value in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", f"/broker.v1.CredentialBroker/{rpc}".encode()),
            (b":authority", f"127.0.0.1:{port}".encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *headers,
        ]
    )
    body = b"\x00" + struct.pack(">I", len(message)) + message
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(4, 0, 0, b"")  # SETTINGS
            + _frame(1, 4, 1, block)  # HEADERS, END_HEADERS
            + _frame(0, 1, 1, body)  # DATA, END_STREAM
        )
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
            while len(received) >= 9 and len(received) >= 9 + int.from_bytes(received[:3], "big"):
                length = int.from_bytes(received[:3], "big")
                kind, flags, stream = received[3], received[4], received[5:9]
                received = received[9 + length :]
                if kind == 4 and not flags & 1:
                    conn.sendall(_frame(4, 1, 0, b""))  # SETTINGS ACK
                if int.from_bytes(stream, "big") == 1 and (kind == 3 or flags & 1):
                    return True  # RST_STREAM, or END_STREAM (the trailers)
                if kind == 7:  # GOAWAY
                    return False
    return False


@pytest.fixture
def every_log() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Everything logged, by any logger and at any level, in both formats."""
    with (
        captured_logs(JsonFormatter(), logging.DEBUG) as json_sink,
        captured_logs(FieldsFormatter(TEXT_FORMAT), logging.DEBUG) as text_sink,
    ):
        yield json_sink, text_sink


async def test_metadata_that_is_not_utf8_never_reaches_a_log(
    guarded: tuple[Running, str], every_log: tuple[io.StringIO, io.StringIO]
) -> None:
    running, token = guarded
    request = pb.GetConnectionRequest(tenant_id="acme").SerializeToString()
    latin1 = f"Bearer {token}é".encode("latin-1")  # é is 0xe9 here: not UTF-8
    sent = [
        [(b"authorization", latin1)],
        [(b"authorization", b"Bearer " + token.encode() + b"\xff\xfe")],
        [(b"x-request-id", b"id\xe9\r\nforged line\x1b[31m"), (b"authorization", latin1)],
    ]
    for headers in sent:
        answered = await asyncio.to_thread(
            raw_call, running.broker.port, "GetConnection", request, headers
        )
        assert answered
    await asyncio.sleep(0.1)
    json_log, text_log = (sink.getvalue() for sink in every_log)

    for log in (json_log, text_log):
        assert token not in log
        assert token[:12] not in log
        assert "forged line" not in log
        assert RAW.search(log) is None
    entries = [json.loads(line) for line in json_log.splitlines()]
    # gRPC logs each value it cannot decode (at ERROR, each time the call's metadata is read):
    # the record is kept, without the value or the UnicodeDecodeError that holds it.
    grpc_errors = [e for e in entries if e["logger"].startswith("grpc") and e["level"] == "ERROR"]
    assert len(grpc_errors) >= len(sent)
    for entry in grpc_errors:
        assert re.fullmatch(r"Invalid encoding on <\d+ bytes, not logged>", entry["message"])
        assert "exception" not in entry
    rpcs = [e for e in entries if e["logger"] == "broker.service"]
    assert [e["code"] for e in rpcs] == ["UNAUTHENTICATED"] * len(sent)

    ok = await running.stub.CreateConnection(
        pb.CreateConnectionRequest(tenant_id="acme"),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    assert ok.connection.tenant_id == "acme", "and it goes on serving"
