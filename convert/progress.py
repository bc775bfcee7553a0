"""The converter commands' progress bar (convert, recalibrate): one look for every long step."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


def step_progress(console: Console) -> Progress:
    """Spinner, step, bar and elapsed time on `console` (stderr), gone when done."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
