"""A TCP fault proxy for tests: a port on 127.0.0.1 in front of PostgreSQL (or any TCP server)
whose behaviour is switched while the test runs, so one replica can lose, or hang on, the
database while another keeps using it directly.

    proxy = PgProxy(5432).start()              # or: with PgProxy(5432).start() as proxy:
    url = proxy.url_for(database_url)          # same user, password and database, via the proxy
    proxy.mode = "hang"                        # or proxy.set("hang"); takes effect at once
    proxy.set("flap", every=0.3)               # pass 0.3 s, reset 0.3 s, pass 0.3 s, ...
    proxy.mode = "pass"
    proxy.counts["accepted"], proxy.open       # what it saw
    proxy.stop()

Modes:
    pass    forward both ways.
    refuse  nothing listens on the port any more: connects are refused (ECONNREFUSED); the
            connections already open are closed (FIN), as when the server process is gone.
            Back to any other mode, the same port listens again (`set` raises OSError in
            the unlikely case that another process took the port meanwhile).
    reset   every open connection is reset (RST: SO_LINGER 0, then close), and so is every
            new one as soon as it is accepted.
    hang    connections are accepted and kept, and nothing is forwarded either way (bytes,
            nor closes): a database that swallows packets. Back to `pass`, what was held
            is delivered, as TCP would after a short partition.
    flap    `pass` and `reset` in turn, each for `every` seconds (the reset at each switch).

Counts (`counts`, a Counter): "accepted" connections; of those ended, "reset" the ones the
proxy reset and "closed" the others (closed by either side, or by `refuse`). `open`: open now.

Everything runs on one asyncio loop in a daemon thread; `set` returns once the mode applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import Counter
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MODES = ("pass", "refuse", "reset", "hang", "flap")
CHUNK = 65536


class PgProxy:
    """The proxy. `mode` is read and written from any thread; the rest belongs to its loop."""

    def __init__(self, upstream_port: int = 5432, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.counts: Counter[str] = Counter()
        self.port = 0  # the proxy's port, known once started
        self._mode = "pass"
        self._every = 0.5
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None  # set while bytes may pass
        self._flapper: asyncio.Task[None] | None = None
        self._resetting = False  # in `reset`, or in the reset half of `flap`

    # -- the API a test uses ------------------------------------------------------------------

    def start(self) -> PgProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        """Close the port and every connection, and end the thread."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> PgProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self.set(mode)

    def set(self, mode: str, *, every: float | None = None) -> None:
        """Switch to `mode` (one of MODES); `every` is flap's half period in seconds."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self._call(self._apply(mode, self._every if every is None else every))

    @property
    def open(self) -> int:
        return len(self._links)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def url_for(self, database_url: str) -> str:
        """`database_url` (postgresql://user:password@host:port/db?…) through the proxy."""
        split = urlsplit(database_url)
        user, at, _ = split.netloc.rpartition("@")
        return urlunsplit(split._replace(netloc=f"{user}{at}127.0.0.1:{self.port}"))

    # -- on the proxy's loop --------------------------------------------------------------------

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        if self._flowing is None:
            self._flowing = asyncio.Event()
            self._flowing.set()
        self._server = await asyncio.start_server(
            self._accepted, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _apply(self, mode: str, every: float) -> None:
        assert self._flowing is not None
        self._mode, self._every = mode, every
        if self._flapper is not None:
            self._flapper.cancel()
            self._flapper = None
        if mode == "refuse":
            if self._server is not None:
                self._server.close()
                self._server = None
            for link in list(self._links):
                link.close(reset=False)
        elif self._server is None:
            await self._listen()
        if mode == "hang":
            self._flowing.clear()
        else:
            self._flowing.set()
        self._resetting = mode == "reset"
        if mode == "reset":
            self._reset_all()
        elif mode == "flap":
            self._flapper = asyncio.create_task(self._flap(every))

    async def _flap(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self._resetting = True
            self._reset_all()
            await asyncio.sleep(every)
            self._resetting = False

    def _reset_all(self) -> None:
        for link in list(self._links):
            link.close(reset=True)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        link = _Link(self, writer)
        self.counts["accepted"] += 1
        self._links.add(link)
        if self._resetting:
            link.close(reset=True)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            link.close(reset=True)
            return
        if link.closed:  # reset or refused while connecting upstream
            _abort(up_writer, reset=True)
            return
        link.upstream = up_writer
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, up_writer)),
            asyncio.create_task(self._pump(link, up_reader, writer)),
        ]

    async def _pump(
        self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        assert self._flowing is not None
        try:
            while True:
                data = await source.read(CHUNK)
                await self._flowing.wait()  # `hang` holds it here, the end of stream too
                if not data:
                    break
                sink.write(data)
                await sink.drain()
        except (OSError, RuntimeError):
            pass
        link.close(reset=False)

    async def _shutdown(self) -> None:
        if self._flapper is not None:
            self._flapper.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            link.close(reset=False)
        others = asyncio.all_tasks() - {asyncio.current_task()}
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


class _Link:
    """One client connection and its upstream connection; `tasks` pump bytes between them."""

    def __init__(self, proxy: PgProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def close(self, *, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy._links.discard(self)
        self.proxy.counts["reset" if reset else "closed"] += 1
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for writer in (self.client, self.upstream):
            if writer is not None:
                _abort(writer, reset=reset)


def _abort(writer: asyncio.StreamWriter, *, reset: bool) -> None:
    """Close at once: with a TCP reset (SO_LINGER 0), or an orderly FIN."""
    if reset:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.transport.close()
