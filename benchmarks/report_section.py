"""What every benchmark's section of BENCHMARKS.md shares: the machine line, and the
replacement of the section between its markers.

The machine is described when a benchmark runs and is saved with its results, so a
section re-rendered later (`--report-only`) names the machine, software and date of the
run, not of the re-render. Only the text between a benchmark's markers is generated:
what a person writes around it, such as what a run's numbers mean, survives every
re-render, and nothing here may write outside the markers.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from importlib.metadata import version
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


@dataclass(frozen=True)
class Machine:
    """Where and when a run happened, with the versions of the packages it measured."""

    architecture: str
    cpu: str
    cores: int
    system: str
    python: str
    versions: dict[str, str]
    date: str

    def line(self, load_start: float, load_end: float) -> str:
        """The section's machine line; `load_*` are the 1-minute load averages of the run."""
        versions = ", ".join(f"{name} {number}" for name, number in self.versions.items())
        return (
            f"Machine: {self.architecture}, {self.cpu} ({self.cores} cores), {self.system}, "
            f"Python {self.python}; {versions}. Date: {self.date}. Load average (1 min) at "
            f"the start {load_start:.2f}, at the end {load_end:.2f}."
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine(packages: Sequence[str]) -> Machine:
    """This machine now, with the installed versions of `packages` (distribution names)."""
    return Machine(
        architecture=platform.machine(),
        cpu=_cpu_model(),
        cores=len(os.sched_getaffinity(0)),
        system=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        versions={name: version(name) for name in packages},
        date=date.today().isoformat(),
    )


def replace_section(name: str, section: str, path: Path = BENCHMARKS_MD) -> None:
    """Put `section` between `<!-- name:start -->` and `<!-- name:end -->` in `path`,
    appending both markers at the end when the file has none."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    marked = f"{start}\n{section}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + marked + tail
    else:
        text = text.rstrip("\n") + "\n\n" + marked + "\n"
    path.write_text(text)
