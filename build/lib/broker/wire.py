"""How broker.v1 messages cross the wire: the service registered with request parsers that turn
a malformed frame into INVALID_ARGUMENT (gRPC's own would answer UNKNOWN), and messages that
hold credentials made unprintable, so no log line or traceback can show them whole."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from broker.v1 import broker_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["CredentialBroker"]
# Every message that carries a secret key or session token, directly or inside.
HOLDS_CREDENTIALS = (pb.Credentials, pb.IssueCredentialsResponse, pb.WatchCredentialsResponse)


class Malformed:
    """Stands in for a request frame that did not parse; the handler answers INVALID_ARGUMENT."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _tolerant(message_type: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Malformed(message_type.DESCRIPTOR.full_name)

    return parse


def add_to_server(servicer: Any, server: grpc.aio.Server) -> None:
    """Register `servicer`'s methods for every RPC of broker.v1.CredentialBroker."""
    handlers = {}
    for method in SERVICE.methods:
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _redacted(message: Message) -> str:
    return f"<{message.DESCRIPTOR.name}: credentials redacted>"


for _holder in HOLDS_CREDENTIALS:
    _holder.__repr__ = _redacted  # type: ignore[assignment,method-assign]
    _holder.__str__ = _redacted  # type: ignore[assignment,method-assign]
