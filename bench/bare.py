"""The ceiling of the hot path: a bare grpc.aio handler that answers IssueCredentials with a
prebuilt response (the same bytes the broker sends), on the broker's own server options.

    python -m bench.bare RESPONSE_FILE [--loop asyncio|uvloop]

Prints `{"port": N}` once serving; on SIGTERM prints `{"served": N}` and exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from broker.config import load_settings
from broker.server import run_loop, server_options
from broker.v1 import broker_pb2 as pb
from broker.wire import GenericOnly

SERVICE = "broker.v1.CredentialBroker"


class Bare:
    def __init__(self, response: pb.IssueCredentialsResponse) -> None:
        self.response = response
        self.served = 0

    async def IssueCredentials(self, request: Any, context: Any) -> pb.IssueCredentialsResponse:
        self.served += 1
        return self.response


async def serve(response: pb.IssueCredentialsResponse, port: int) -> None:
    server = grpc.aio.server(options=server_options(load_settings()))
    bare = Bare(response)
    # Registered as the broker registers its services (broker.wire), this one method only.
    handlers = {
        "IssueCredentials": grpc.unary_unary_rpc_method_handler(
            bare.IssueCredentials,
            request_deserializer=pb.IssueCredentialsRequest.FromString,
            response_serializer=pb.IssueCredentialsResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, GenericOnly(server))
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(json.dumps({"port": port}), flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(0)
    print(json.dumps({"served": bare.served}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("response", type=Path)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    response = pb.IssueCredentialsResponse.FromString(args.response.read_bytes())
    run_loop(serve(response, args.port), args.loop)


if __name__ == "__main__":
    main()
