"""Broker commands run as real processes, their output kept in a file to read as they go."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


class BrokerProcess:
    """`broker <args>` in a subprocess; `wait_for` a pattern in what it printed."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.process = subprocess.Popen(
            [str(BIN / "broker"), *args], stdout=self._out, stderr=subprocess.STDOUT, env=env
        )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (found := re.search(pattern, self.text())) is None:
            assert self.process.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.05)
        return found

    def wait_serving(self) -> int:
        """The gRPC port, from the `serving` log line (JSON or text)."""
        found = self.wait_for(r'"serving".*?"port": (\d+)|serving .*port=(\d+)')
        return int(found[1] or found[2])

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._out.close()
