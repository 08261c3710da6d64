"""A fault-injecting AWS endpoint for tests: an HTTP proxy on 127.0.0.1 in front of the local
emulator. It forwards every request, or, on command, injects a fault into the AWS actions it is
told (AssumeRole by default): STS's Throttling error, a 5xx, a refusal (an error `code` of
REFUSALS), added latency, a hang past the client's timeout, a reset connection, or being down
entirely. It counts what it saw.

    faults = FaultyAws(local_aws.endpoint_url).start()
    faults.inject("throttle")            # every AssumeRole from now on is throttled
    faults.inject("latency", seconds=0.05)
    faults.inject("refuse", code="ValidationError")
    faults.inject("down")                # every request, any action, is reset
    faults.clear()
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

MODES = ("pass", "throttle", "error", "refuse", "latency", "hang", "reset", "down")
# The permanent answers "refuse" gives, with their HTTP status.
REFUSALS = {"AccessDenied": 403, "ValidationError": 400, "InvalidClientTokenId": 403}


class LoopbackProxy:
    """An HTTP server on 127.0.0.1 in front of an AWS endpoint (`upstream`): each POST goes to
    `_handle`, on a thread of its own; `ask_upstream` forwards one."""

    def __init__(self, upstream: str) -> None:
        split = urlsplit(upstream)
        self._upstream = (split.hostname or "127.0.0.1", split.port or 80)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                proxy._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    def ask_upstream(
        self, handler: BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """The upstream's answer to the request `handler` holds (its `body` already read)."""
        upstream = http.client.HTTPConnection(*self._upstream, timeout=30)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() != "connection"}
            upstream.request("POST", handler.path, body, headers)
            answer = upstream.getresponse()
            return answer.status, answer.getheaders(), answer.read()
        finally:
            upstream.close()


def read_request(handler: BaseHTTPRequestHandler) -> tuple[bytes, str]:
    """A request's body and its AWS Query action ("?" when it names none)."""
    body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
    return body, parse_qs(body.decode(errors="replace")).get("Action", ["?"])[0]


def send_answer(
    handler: BaseHTTPRequestHandler,
    status: int,
    headers: list[tuple[str, str]],
    data: bytes,
    answered: Callable[[], None] = lambda: None,
) -> None:
    """Send an answer of `data`, with `headers` but those of its framing (its length is
    declared anew); `answered` is called just before the body leaves."""
    handler.send_response(status)
    for key, value in headers:
        if key.lower() not in ("content-length", "connection", "transfer-encoding"):
            handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    answered()
    handler.wfile.write(data)


class FaultyAws(LoopbackProxy):
    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.mode = "pass"
        self.seconds = 0.0
        self.budget: int | None = None
        self.code = "AccessDenied"  # what "refuse" answers
        self.actions: frozenset[str] = frozenset({"AssumeRole"})
        self.requests: Counter[str] = Counter()  # action → requests seen
        self.faults: Counter[str] = Counter()  # mode → faults injected
        self.in_flight = 0
        self.most_in_flight = 0  # of the actions faults apply to
        self._lock = threading.Lock()

    def inject(
        self,
        mode: str,
        *,
        seconds: float = 0.0,
        actions: tuple[str, ...] = (),
        count: int | None = None,
        code: str = "AccessDenied",
    ) -> None:
        """From now on, `mode` for `actions` (all actions when down); after `count` faults, if
        given, requests pass again. `code`: the error "refuse" answers (one of REFUSALS)."""
        assert mode in MODES, mode
        assert code in REFUSALS, code
        with self._lock:
            self.mode, self.seconds, self.budget, self.code = mode, seconds, count, code
            if actions:
                self.actions = frozenset(actions)

    def clear(self) -> None:
        self.inject("pass", actions=("AssumeRole",))

    def total_faults(self) -> int:
        return sum(self.faults.values())

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body, action = read_request(handler)
        with self._lock:
            mode, seconds, code = self.mode, self.seconds, self.code
            applies = mode == "down" or (mode != "pass" and action in self.actions)
            if applies and self.budget is not None:
                applies = self.budget > 0
                self.budget -= 1
            self.requests[action] += 1
            if applies:
                self.faults[mode] += 1
            counted = action in self.actions
            if counted:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
        finished = threading.Event()

        def answered() -> None:
            """The answer is about to leave: from here on the caller may send its next one."""
            if counted and not finished.is_set():
                finished.set()
                with self._lock:
                    self.in_flight -= 1

        try:
            if not applies:
                self._forward(handler, body, answered)
            elif mode == "throttle":
                _error(handler, 400, "Throttling", "Rate exceeded", answered)
            elif mode == "error":
                _error(handler, 503, "ServiceUnavailable", "Service is unavailable", answered)
            elif mode == "refuse":
                _error(handler, REFUSALS[code], code, "Refused by the fault proxy", answered)
            elif mode == "latency":
                time.sleep(seconds)
                self._forward(handler, body, answered)
            elif mode == "hang":
                time.sleep(seconds)
                answered()
                _reset(handler)
            else:  # reset, down
                answered()
                _reset(handler)
        finally:
            answered()

    def _forward(
        self, handler: BaseHTTPRequestHandler, body: bytes, answered: Callable[[], None]
    ) -> None:
        status, headers, data = self.ask_upstream(handler, body)
        send_answer(handler, status, headers, data, answered)


def sts_error(code: str, message: str = "refused", *, status: int = 400) -> bytes:
    """An STS error body, as STS words it (the Query protocol's XML); its Type by `status`."""
    return (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        f"<Error><Type>{'Sender' if status < 500 else 'Receiver'}</Type><Code>{code}</Code>"
        f"<Message>{message}</Message></Error><RequestId>{uuid.uuid4()}</RequestId>"
        "</ErrorResponse>"
    ).encode()


def _error(
    handler: BaseHTTPRequestHandler,
    status: int,
    code: str,
    message: str,
    answered: Callable[[], None],
) -> None:
    body = sts_error(code, message, status=status)
    send_answer(handler, status, [("Content-Type", "text/xml")], body, answered)


def _reset(handler: BaseHTTPRequestHandler) -> None:
    """Close the connection with a TCP reset, as a crashed or unreachable endpoint does."""
    connection: socket.socket = handler.connection
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.close_connection = True
    connection.close()
