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

from collections import Counter
from http.server import BaseHTTPRequestHandler

from tests.faults import LoopbackProxy, read_request, send_answer


class RawSts(LoopbackProxy):
    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        # Set by the test, read by the proxy's threads: what AssumeRole is answered with
        # (status, content type, body), None to forward it.
        self.answer: tuple[int, str, bytes] | None = None
        # Set by the test: forward AssumeRole and cut its answer's body before this marker.
        self.truncate_before: bytes | None = None
        self.requests: Counter[str] = Counter()  # action → requests seen
        self.cut_bodies: list[bytes] = []  # each AssumeRole body as it was sent, cut short

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body, action = read_request(handler)
        self.requests[action] += 1
        answer = self.answer
        if action == "AssumeRole" and answer is not None:
            status, content_type, data = answer
            send_answer(handler, status, [("Content-Type", content_type)], data)
            return
        status, headers, data = self.ask_upstream(handler, body)
        marker = self.truncate_before
        if action == "AssumeRole" and marker and marker in data:
            data = data[: data.index(marker)]
            self.cut_bodies.append(data)
        send_answer(handler, status, headers, data)
