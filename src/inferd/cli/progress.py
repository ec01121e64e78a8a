"""Progress bars for long work on a terminal (downloads, hashing, conversion), via rich.

Implements `cache.reporting.Reporter`. On a terminal each task is a live bar with size, speed and
time left; elsewhere (CI logs, files) rich prints each finished task once instead of animating.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from inferd.cache.reporting import Advance


def steps(console: Console) -> Progress:
    """A bar over counted steps (benchmark levels, tuning steps): done of all, time taken."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=console)


class RichReporter:
    def __init__(self, console: Console) -> None:
        self.console = console

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        # Byte counts get size and speed columns; small step counts (stages) get "n/m".
        by_bytes = total is not None and total > 1000
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
        if by_bytes:
            columns += [DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
        elif total is not None:
            columns += [MofNCompleteColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task_id = progress.add_task(description, total=total)
            yield lambda n: progress.advance(task_id, n)
            progress.update(task_id, completed=total) if total is not None else None

    def note(self, message: str) -> None:
        self.console.print(f"[yellow]{message}[/yellow]")
