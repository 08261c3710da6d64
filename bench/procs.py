"""Processes under measurement: started (optionally pinned to a core), read as they print."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def pinned(command: list[str], core: int | None) -> list[str]:
    """`command` on one core (taskset), where the machine has that core and taskset."""
    if core is None or shutil.which("taskset") is None or core >= (os.cpu_count() or 1):
        return command
    return ["taskset", "-c", str(core), *command]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Process:
    """A subprocess whose output goes to a file; `wait_json` finds a JSON line it printed."""

    def __init__(self, command: list[str], log: Path, *, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = log.open("w")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command, stdout=self._out, stderr=subprocess.STDOUT, env=env
        )

    def lines(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found

    def wait_json(self, key: str, timeout: float = 60) -> dict[str, Any]:
        """The first JSON line printed with `key` in it (a log line's message counts)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if key in line or line.get("message") == key:
                    return line
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.log.name} exited:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.log.name} never printed {key!r}")
            time.sleep(0.02)

    def cpu_seconds(self) -> float:
        """User and system CPU time the process has used so far."""
        return cpu_seconds(self.process.pid)

    def rss_bytes(self) -> int:
        """Resident memory of the process now."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def kill(self) -> None:
        """SIGKILL: the process goes away at once, as a crashed or evicted replica does."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()
