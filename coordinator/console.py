"""The CLI's terminal output: one shared rich console, tables and progress bars."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

# Piped output (CI logs, files) gets wide tables instead of rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 150
console = Console(highlight=False, width=_WIDTH)
errors = Console(stderr=True, highlight=False, width=_WIDTH)


@contextmanager
def progress_bar(description: str, total: int, *, in_bytes: bool = False) -> Iterator:
    """A progress bar; yields ``update(done)`` taking the absolute amount done."""
    columns = [TextColumn("{task.description}"), BarColumn()]
    columns += (
        [DownloadColumn(), TransferSpeedColumn()] if in_bytes else [MofNCompleteColumn()]
    )
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def update(done: int, new_total: int | None = None) -> None:
            progress.update(task, completed=done, total=new_total or total)

        yield update


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"
