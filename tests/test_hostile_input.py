"""Hostile input through the real server: generated strings, unicode and bytes in every field of
every RPC, and frames that are not protobuf at all. Never INTERNAL or UNKNOWN, never a crash;
the server stays SERVING. The number of inputs tried is reported at the end of the run."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import server
from broker.config import load_settings
from broker.emulator import Identity
from broker.v1 import broker_pb2 as pb
from broker.wire import SERVICE

TRIED: Counter[str] = Counter()
ANSWERS: Counter[str] = Counter()
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
EXAMPLES = 150

# Every field a request can carry, from short ASCII to any unicode, control characters included.
texts = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(codec="ascii"), max_size=80),
    st.sampled_from(["", " ", "acme", "run-1", "arn:aws:iam::222222222222:role/r", "\x00", "💥"]),
)


class BrokerThread:
    """A broker on its own event loop in a thread, so hypothesis can drive it synchronously."""

    def __init__(self, overrides: dict[str, Any], identity: Identity) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        settings_ = load_settings(**overrides)
        credentials = (identity.access_key_id, identity.secret_access_key)
        self.broker = self._run(server.start(settings_, static_credentials=credentials))
        self.address = f"127.0.0.1:{self.broker.port}"

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def stop(self) -> None:
        self._run(self.broker.stop(grace=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


@pytest.fixture(scope="module")
def channel(
    local_aws: object,
    broker_identity: Identity,
    template_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[grpc.Channel]:
    overrides = {
        "listen": "127.0.0.1:0",
        "database_url": f"sqlite:///{tmp_path_factory.mktemp('hostile') / 'broker.db'}",
        "aws_endpoint_url": local_aws.endpoint_url,  # type: ignore[attr-defined]
        "template_url": template_url,
        "verify_wait": 0.0,
        "metrics_listen": "127.0.0.1:0",
    }
    running = BrokerThread(overrides, broker_identity)
    with grpc.insecure_channel(running.address) as opened:
        yield opened
        health = health_pb2_grpc.HealthStub(opened)
        answer = health.Check(health_pb2.HealthCheckRequest(service=SERVICE.full_name))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    running.stop()


def call(channel: grpc.Channel, rpc: str, payload: bytes) -> grpc.StatusCode:
    """Send `payload` as the request frame of `rpc`; the status it ends with."""
    streaming = SERVICE.methods_by_name[rpc].server_streaming
    path = f"/{SERVICE.full_name}/{rpc}"
    try:
        if streaming:
            stream = channel.unary_stream(path)(payload, timeout=10)
            next(iter(stream))
            stream.cancel()
            code = grpc.StatusCode.OK
        else:
            channel.unary_unary(path)(payload, timeout=10)
            code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
    TRIED[rpc] += 1
    ANSWERS[code.name] += 1
    return code


def fields_of(rpc: str) -> dict[str, st.SearchStrategy[Any]]:
    """Each field of the RPC's request, and what to draw for it by its type."""
    numbers = st.integers(-(2**31), 2**31 - 1)
    return {
        f.name: numbers if f.type == f.TYPE_INT32 else texts
        for f in SERVICE.methods_by_name[rpc].input_type.fields
    }


@pytest.mark.parametrize("rpc", [m.name for m in SERVICE.methods])
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_text_in_any_field(channel: grpc.Channel, rpc: str, data: st.DataObject) -> None:
    request_type = getattr(pb, SERVICE.methods_by_name[rpc].input_type.name)
    values = {name: data.draw(kind, label=name) for name, kind in fields_of(rpc).items()}
    code = call(channel, rpc, request_type(**values).SerializeToString())
    assert code not in NEVER, (rpc, values)


@pytest.mark.parametrize("rpc", [m.name for m in SERVICE.methods])
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(frame=st.binary(max_size=300))
def test_any_bytes_as_the_request_frame(channel: grpc.Channel, rpc: str, frame: bytes) -> None:
    code = call(channel, rpc, frame)
    assert code not in NEVER, (rpc, frame)


@pytest.mark.parametrize("rpc", [m.name for m in SERVICE.methods])
def test_broken_frames_are_invalid_argument(channel: grpc.Channel, rpc: str) -> None:
    for frame in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x0f"):
        assert call(channel, rpc, frame) == grpc.StatusCode.INVALID_ARGUMENT


def report() -> str:
    total = sum(TRIED.values())
    per_rpc = ", ".join(f"{rpc} {n}" for rpc, n in sorted(TRIED.items()))
    answers = ", ".join(f"{code} {n}" for code, n in ANSWERS.most_common())
    return f"hostile inputs tried: {total} ({per_rpc}); answers: {answers}"
