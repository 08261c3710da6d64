"""Figures, each beside its baseline and the ratio, written as Markdown and JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path


@dataclass
class Figure:
    section: str
    what: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_is: str = ""
    target: str = ""  # e.g. "≥ 0.9×", judged on the ratio
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline


def sts_bound(section: str, what: str, most: float, bound: int) -> Figure:
    """The most AssumeRole calls in flight at once, against BROKER_STS_MAX_CONCURRENCY."""
    return Figure(
        section, what, most, "calls", bound, "BROKER_STS_MAX_CONCURRENCY", "≤ 1×", most <= bound
    )


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        print(
            f"  {figure.section}: {figure.what}: {_number(figure.value)} {figure.unit}"
            + (
                f" (baseline {_number(figure.baseline)}, ratio {figure.ratio:.2f})"
                if figure.ratio is not None
                else ""
            ),
            flush=True,
        )
        return figure

    def note(self, section: str, text: str) -> None:
        self.notes.setdefault(section, []).append(text)

    def markdown(self, title: str, machine: dict[str, str], command: str) -> str:
        lines = [f"# {title}", "", f"Measured {machine['date']} with `{command}` on:", ""]
        lines += [f"- {key}: {value}" for key, value in machine.items() if key != "date"]
        sections = list(dict.fromkeys(f.section for f in self.figures))
        for section in sections:
            lines += ["", f"## {section}", ""]
            lines += self.notes.get(section, [])
            if self.notes.get(section):
                lines.append("")
            lines += [
                "| figure | value | baseline | ratio | target |",
                "|---|---|---|---|---|",
            ]
            for f in (f for f in self.figures if f.section == section):
                baseline = (
                    f"{_number(f.baseline)} {f.unit} ({f.baseline_is})"
                    if f.baseline is not None
                    else "—"
                )
                ratio = f"{f.ratio:.2f}×" if f.ratio is not None else "—"
                target = f.target or "—"
                if f.met is not None:
                    target += " ✅" if f.met else " ❌"
                what = f.what + (f" ({f.note})" if f.note else "")
                lines.append(
                    f"| {what} | {_number(f.value)} {f.unit} | {baseline} | {ratio} | {target} |"
                )
        return "\n".join(lines) + "\n"

    def write(self, folder: Path, machine: dict[str, str], command: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "benchmarks.md").write_text(self.markdown("Benchmarks", machine, command))
        (folder / "benchmarks.json").write_text(
            json.dumps(
                {
                    "machine": machine,
                    "command": command,
                    "figures": [asdict(f) | {"ratio": f.ratio} for f in self.figures],
                },
                indent=2,
            )
            + "\n"
        )


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = Path("/proc/meminfo").read_text().split()[1]
    h2load = subprocess.run(
        ["h2load", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{int(memory) // 1024 // 1024} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "uvloop": version("uvloop"),
        "load generator": h2load or "h2load",
    }
