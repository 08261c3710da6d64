"""How broker.v1 messages cross the wire: the service registered with request parsers that turn
a malformed frame into INVALID_ARGUMENT (gRPC's own would answer UNKNOWN), and messages that
hold credentials made unprintable, so no log line or traceback can show them whole."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from broker.v1 import broker_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["CredentialBroker"]
STREAMED = ("WatchCredentials",)  # registered apart (add_to_server)
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


class GenericOnly:
    """`server` as a generated `add_*_to_server` function sees it: the handlers it adds are
    served through its generic handler only. grpc.aio's accept loop keeps one request
    outstanding for every method registered with `add_registered_method_handlers` and waits
    on all of them for every call that arrives: each registered method costs every call,
    whichever method it is, about 7k instructions (docs/performance.md). A generic handler
    costs only the calls that reach it, the lookup of its service's method table. What
    registration buys is a queue of its own in gRPC core (calls not yet taken by the
    server): every call of the methods not registered waits in one queue, in turn."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Not registered: the generic handler added beside them serves these methods."""


Metadata = tuple[tuple[str, str | bytes], ...]
# The request metadata of the call under way, as gRPC gave it to `_Service`'s lookup, in the
# call's own task before its handler runs (each call's task has its own context, so no
# call sees another's). grpc.aio builds the tuple again on every invocation_metadata().
METADATA: ContextVar[Metadata | None] = ContextVar("broker_call_metadata", default=None)


class _Service(grpc.GenericRpcHandler):
    """The methods of broker.v1.CredentialBroker by path, as grpc.method_handlers_generic_handler
    finds them; keeps each call's metadata in METADATA."""

    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        self._handlers = {f"/{SERVICE.full_name}/{name}": h for name, h in handlers.items()}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._handlers.get(handler_call_details.method)
        if handler is not None:
            METADATA.set(handler_call_details.invocation_metadata)
        return handler


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
    server.add_generic_rpc_handlers((_Service(handlers),))
    # WatchCredentials is registered as well, alone (GenericOnly says what each registered
    # method costs): gRPC core queues the calls of a registered method apart from all others,
    # so a reconnect storm's thousands of streams waiting to be taken do not hold up an
    # IssueCredentials, a Disconnect or a health check queued behind them.
    streams = {name: handlers[name] for name in STREAMED}
    server.add_registered_method_handlers(SERVICE.full_name, streams)


def _redacted(message: Message) -> str:
    return f"<{message.DESCRIPTOR.name}: credentials redacted>"


for _holder in HOLDS_CREDENTIALS:
    _holder.__repr__ = _redacted  # type: ignore[assignment,method-assign]
    _holder.__str__ = _redacted  # type: ignore[assignment,method-assign]
