"""Log set-up: one line per event, `key=value` fields after the message. Never pass a secret."""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class FieldsFormatter(logging.Formatter):
    """`time level logger message key=value …`, the fields taken from `extra=`. One record is
    one line: a character that is not printable (newline, CR, ESC, any other C0 or C1 control,
    DEL, U+2028/2029, bidi controls) is written as its escape wherever it comes from, so no
    value can start a line of its own or recolour the terminal. A traceback follows on lines
    of its own, each indented, so none can pass for a record."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        fields = " ".join(
            f"{key}={value!r}" if isinstance(value, str) and " " in value else f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_")
        )
        if fields:
            line = f"{line} {fields}"
        if not line.isprintable():  # one test of the whole line, which is nearly always printable
            line = escape(line)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for more in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if more:
                line += "".join(f"\n  {escape(part)}" for part in more.splitlines())
        return line


def escape(text: str) -> str:
    """`text` with each character that is not printable written as its Python escape
    (`\\n`, `\\x1b`, `\\u2028`, …); printable text, the common case, comes back as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


MAX_FIELD = 128  # characters of a caller's value that a log line shows, at most
_ASCII_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(0x20), 0x7F)} | {
    ord("\\"): "\\\\",
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def untrusted(fields: dict[str, object], key: str, value: str) -> None:
    """Put `value`, which a caller sent and which is not in its validated form, into `fields`
    at `key` with a fixed bound: at most MAX_FIELD characters of it, in printable ASCII
    (anything else escaped), followed by its length (`<key>_chars`) and its `digest`
    (`<key>_sha256`)."""
    cut = value[:MAX_FIELD].translate(_ASCII_ESCAPES)
    fields[key] = cut.encode("ascii", "backslashreplace").decode("ascii")[:MAX_FIELD]
    fields[f"{key}_chars"] = len(value)
    fields[f"{key}_sha256"] = digest(value)


def digest(value: str) -> str:
    """A short digest of a caller's value (12 hex digits of its SHA-256), to match it in a log
    without showing it."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]


# At DEBUG these log STS response bodies (secret keys) and signed requests (session tokens).
CREDENTIAL_LEAKING_LOGGERS = ("botocore", "aiobotocore", "boto3", "urllib3", "werkzeug")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every `extra=` field."""

    # The second last formatted and its text (one attribute: read and set at once).
    _second: tuple[int, str] = (-1, "")

    def time(self, created: float) -> str:
        """ISO 8601 UTC to the millisecond; the part up to the second is made once a second."""
        second = int(created)
        known, prefix = self._second
        if second != known:
            prefix = self.second(second)
        return prefix + _MILLISECONDS[int((created - second) * 1000)]

    def second(self, second: int) -> str:
        """The time up to `second` (epoch seconds), which `time` then reuses."""
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        self._second = (second, prefix)
        return prefix

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # A record's own attributes come first, `extra=` fields after them.
        for key, value in itertools.islice(vars(record).items(), _OWN_ATTRIBUTES, None):
            if key not in _STANDARD and key[0] != "_":
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = _ENCODER.encode(entry)  # escapes every control character but DEL
        return line.replace("\x7f", "\\u007f") if "\x7f" in line else line


_OWN_ATTRIBUTES = len(vars(logging.LogRecord("", 0, "", 0, "", (), None)))
_MILLISECONDS = [f".{ms:03d}+00:00" for ms in range(1000)]  # what follows the second
# json.dumps(default=…) would make one per line. ensure_ascii (the default) escapes all but
# ASCII, U+2028/2029 included: JavaScript and some log viewers end a line there.
_ENCODER = json.JSONEncoder(default=str)


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines in batches: at most `interval` seconds after they were logged, at once
    for WARNING and above, and at exit (logging.shutdown flushes). Written as they came, every
    RPC's line was a system call of its own; a busy broker now writes ten times a second. The
    same trade as nginx's buffered access log: a SIGKILL can lose the last `interval` of INFO
    lines. Besides records' lines it holds access records (AccessLog), made into lines when
    the batch is written."""

    def __init__(self, stream: Any, interval: float = 0.1, max_lines: int = 1000) -> None:
        super().__init__(stream)
        self.interval = interval
        self.max_lines = max_lines
        # Lines and access records not written yet, in the order they came. Appended by any
        # thread without the lock (a deque's append and popleft are atomic); taken out by
        # `flush`, under it.
        self._pending: collections.deque[str | tuple[Any, ...]] = collections.deque()
        self._closed = threading.Event()
        threading.Thread(target=self._flush_forever, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # as logging.StreamHandler: report, never raise
            self.handleError(record)
            return
        self._pending.append(line)
        if record.levelno >= logging.WARNING or len(self._pending) >= self.max_lines:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            pending = self._pending
            if pending:
                # As many as there are now: what comes meanwhile waits for the next batch.
                batch = [pending.popleft() for _ in range(len(pending))]
                formatter = self.formatter
                lines = [
                    item if isinstance(item, str) else item[0].line(item, formatter)
                    for item in batch
                ]
                self.stream.write("\n".join(lines) + "\n")
            super().flush()

    def close(self) -> None:
        self._closed.set()
        self.flush()
        super().close()

    def _flush_forever(self) -> None:
        while not self._closed.wait(self.interval):
            self.flush()


class AccessLog:
    """The access record: the INFO line of `message` that `logger` writes for every RPC
    (service.py's `rpc`: method, code, tenant, run, latency_ms, request_id, caller), at a cost
    near nothing on the event loop. nginx keeps its access log apart from its error log for
    this reason: one line per request, of fields already known, buffered; everything else
    goes through the general machinery.

    `write` puts the fields, as they are, in the BatchingStreamHandler's buffer: no
    LogRecord, no lock, no formatting. The handler's thread makes each into the very line
    `logger.info(message, extra=fields)` would have put through the JsonFormatter, in one
    f-string, when it writes the batch. The caller gives only plain text (what a JSON string
    holds as it is: validated ids, its own names); anything else goes through `logging`,
    escaped and bounded (`untrusted`).

    It writes only while the handler `configure` set up in the JSON format is the one place
    a record of `logger` would go, with no filter, and INFO is enabled; otherwise (the text
    format, another handler such as pytest's or an embedding program's, a filter, a level
    above INFO) it writes nothing and says so, and the caller logs through `logging`, so
    whatever is attached there still sees every call."""

    def __init__(self, logger: logging.Logger, message: str) -> None:
        self._logger = logger
        # What follows the time, up to the first field's value.
        self._head = (
            f'", "level": "INFO", "logger": {_ENCODER.encode(logger.name)}, '
            f'"message": {_ENCODER.encode(message)}, "method": "'
        )

    def write(
        self,
        method: str,
        code: str,
        tenant: str,
        run: str,
        seconds: float,
        request_id: str,
        caller: str,
    ) -> bool:
        """Write a call's record (every text plain; `seconds` its latency), or return False
        if it must go through `logging` instead (nothing was written)."""
        root = logging.root
        handlers = root.handlers
        if len(handlers) != 1 or root.filters:
            return False
        handler = handlers[0]
        if (
            type(handler) is not BatchingStreamHandler
            or type(handler.formatter) is not JsonFormatter
            or handler.filters
            or handler.level > logging.INFO
            or not self._logger.isEnabledFor(logging.INFO)
        ):
            return False
        logger: logging.Logger | None = self._logger
        while logger is not root and logger is not None:
            if logger.handlers or logger.filters or not logger.propagate:
                return False
            logger = logger.parent
        pending = handler._pending
        pending.append((self, time.time(), method, code, tenant, run, seconds, request_id, caller))
        if len(pending) >= handler.max_lines:
            handler.flush()
        return True

    def line(self, record: tuple[Any, ...], formatter: JsonFormatter) -> str:
        """The line of a record `write` buffered (made by the handler's thread)."""
        _, created, method, code, tenant, run, seconds, request_id, caller = record
        return (
            f'{{"time": "{formatter.time(created)}{self._head}{method}", "code": "{code}", '
            f'"tenant": "{tenant}", "run": "{run}", "latency_ms": {seconds * 1000:.2f}, '
            f'"request_id": "{request_id}", "caller": "{caller}"}}'
        )


def configure(level: str, fmt: str = "json") -> None:
    # Fields no line shows, not worth their cost on every RPC's line (the logging docs'
    # "Optimization" section): the caller's source location, thread and process.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchingStreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else FieldsFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    for replaced in root.handlers:
        if isinstance(replaced, BatchingStreamHandler):
            replaced.close()
    root.handlers[:] = [handler]
    root.setLevel(level)
    protect_secrets()


def protect_secrets() -> None:
    """Keep the AWS libraries' loggers at INFO or above, whatever the root level: their DEBUG
    output carries credentials; and keep request metadata out of gRPC's own log
    (`GrpcMetadataFilter`). The broker calls this at start-up."""
    for name in CREDENTIAL_LEAKING_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logging.INFO, logger.getEffectiveLevel()))
    logging.getLogger(GRPC_METADATA_LOGGER).addFilter(_GRPC_METADATA_FILTER)  # once: a no-op after


# gRPC's Cython layer turns each request's metadata into text on this logger, and when a value
# is not UTF-8 it logs the value whole, at ERROR, before any handler of ours sees the call:
# "Invalid encoding on b'Bearer <token>…'", with the UnicodeDecodeError (which holds the value
# again) attached.
GRPC_METADATA_LOGGER = "grpc._cython.cygrpc"


class GrpcMetadataFilter(logging.Filter):
    """Lets gRPC's records through without the bytes they carry: each bytes argument becomes
    its length, and an attached UnicodeError (it holds the bytes too) is dropped. Such bytes
    are what a caller sent, such as a metadata value that did not decode: perhaps a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, bytes | bytearray) for a in args):
            record.args = tuple(
                f"<{len(a)} bytes, not logged>" if isinstance(a, bytes | bytearray) else a
                for a in args
            )
        if record.exc_info and isinstance(record.exc_info[1], UnicodeError):
            record.exc_info = None
            record.exc_text = None
        return True


_GRPC_METADATA_FILTER = GrpcMetadataFilter()
