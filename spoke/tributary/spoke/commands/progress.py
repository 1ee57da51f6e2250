"""Progress bars without a refresh thread: rich's default bar redraws from a thread of
its own, and a process running a second thread must not fork, so preparing workers
would have to be fresh interpreters (about 0.4 s of CPU each, see
:mod:`tributary.spoke.worker_fork`). These bars redraw from the caller, at most ten
times a second."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_EVERY = 0.1  # seconds between redraws


class Bars:
    """Named bars, each updated with ``show(name, done, total)``."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._bars: dict[str, Any] = {}
        self._shown = 0.0

    def show(self, name: str, done: int, total: int) -> None:
        if name not in self._bars:
            self._bars[name] = self._progress.add_task(name, total=total)
        now = time.monotonic()
        if done >= total or now - self._shown >= _EVERY:  # rich's update is not free
            self._progress.update(self._bars[name], completed=done)
            self._progress.refresh()
            self._shown = now


@contextmanager
def bars(console: Console) -> Iterator[Bars]:
    with Progress(TextColumn("{task.description:<12}", markup=False),  # names are data
                  BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, auto_refresh=False) as progress:
        yield Bars(progress)
