"""A proxy on 127.0.0.1 in front of an STS endpoint for tests of answers that are not STS's own:
it answers AssumeRole with whatever raw HTTP answer a test sets (status, content type, body:
a proxy's HTML page, a plain-text 429, an STS error such as RegionDisabledException), or
forwards it and cuts the answer's body short before a marker (an answer cut short on its way,
its length not declared). Every other action, and AssumeRole while no answer is set, is
forwarded as it is.

    raw = RawSts(region.endpoint_url).start()
    raw.answer = (403, "text/html", b"<html>Forbidden</html>")
    raw.answer = None                       # forward again
    raw.truncate_before = b"<SessionToken>"  # forward, cut the body there
    raw.stop()
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class RawSts:
    def __init__(self, upstream: str) -> None:
        split = urlsplit(upstream)
        self._upstream = (split.hostname or "127.0.0.1", split.port or 80)
        # Set by the test, read by the proxy's threads: what AssumeRole is answered with
        # (status, content type, body), None to forward it.
        self.answer: tuple[int, str, bytes] | None = None
        # Set by the test: forward AssumeRole and cut its answer's body before this marker.
        self.truncate_before: bytes | None = None
        self.requests: Counter[str] = Counter()  # action → requests seen
        self.cut_bodies: list[bytes] = []  # each AssumeRole body as it was sent, cut short
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

    def start(self) -> RawSts:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        action = parse_qs(body.decode(errors="replace")).get("Action", ["?"])[0]
        self.requests[action] += 1
        answer = self.answer
        if action == "AssumeRole" and answer is not None:
            status, content_type, data = answer
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        upstream = http.client.HTTPConnection(*self._upstream, timeout=30)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() != "connection"}
            upstream.request("POST", handler.path, body, headers)
            forwarded = upstream.getresponse()
            data = forwarded.read()
        finally:
            upstream.close()
        marker = self.truncate_before
        if action == "AssumeRole" and marker and marker in data:
            data = data[: data.index(marker)]
            self.cut_bodies.append(data)
        handler.send_response(forwarded.status)
        for key, value in forwarded.getheaders():
            if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def sts_error(code: str, message: str = "refused") -> bytes:
    """An STS error body, as STS words it (the Query protocol's XML)."""
    return (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        f"<Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        "<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    ).encode()
