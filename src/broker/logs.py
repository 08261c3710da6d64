"""Log set-up: one line per event, `key=value` fields after the message. Never pass a secret."""

from __future__ import annotations

import itertools
import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class FieldsFormatter(logging.Formatter):
    """`time level logger message key=value …`, the fields taken from `extra=`."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(
            f"{key}={value!r}" if isinstance(value, str) and " " in value else f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_")
        )
        head, sep, rest = line.partition("\n")
        return f"{head} {fields}{sep}{rest}" if fields else line


# At DEBUG these log STS response bodies (secret keys) and signed requests (session tokens).
CREDENTIAL_LEAKING_LOGGERS = ("botocore", "aiobotocore", "boto3", "urllib3", "werkzeug")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every `extra=` field."""

    _second = -1
    _prefix = ""

    def _time(self, created: float) -> str:
        """ISO 8601 UTC to the millisecond; the part up to the second is made once a second."""
        second = int(created)
        if second != self._second:
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._prefix}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._time(record.created),
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
        return _ENCODER.encode(entry)


_OWN_ATTRIBUTES = len(vars(logging.LogRecord("", 0, "", 0, "", (), None)))
_ENCODER = json.JSONEncoder(default=str)  # json.dumps(default=…) would make one per line


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines in batches: at most `interval` seconds after they were logged, at once
    for WARNING and above, and at exit (logging.shutdown flushes). Written as they came, every
    RPC's line was a system call of its own; a busy broker now writes ten times a second. The
    same trade as nginx's buffered access log: a SIGKILL can lose the last `interval` of INFO
    lines."""

    def __init__(self, stream: Any, interval: float = 0.1, max_lines: int = 1000) -> None:
        super().__init__(stream)
        self.interval = interval
        self.max_lines = max_lines
        self._pending: list[str] = []  # formatted lines not written yet; under self.lock
        self._closed = threading.Event()
        threading.Thread(target=self._flush_forever, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # as logging.StreamHandler: report, never raise
            self.handleError(record)
            return
        self._pending.append(line)  # Handler.handle holds self.lock
        if record.levelno >= logging.WARNING or len(self._pending) >= self.max_lines:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._pending:
                lines, self._pending = self._pending, []
                self.stream.write("\n".join(lines) + "\n")
            super().flush()

    def close(self) -> None:
        self._closed.set()
        self.flush()
        super().close()

    def _flush_forever(self) -> None:
        while not self._closed.wait(self.interval):
            self.flush()


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
    output carries credentials. The broker calls this at start-up."""
    for name in CREDENTIAL_LEAKING_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logging.INFO, logger.getEffectiveLevel()))
