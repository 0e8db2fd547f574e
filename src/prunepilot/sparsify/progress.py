"""Progress of the long LLM phases (block-by-block statistics and sparsification, cost probes).

`Reporter(spec)`: spec None -> a rich progress bar on stderr when it is a terminal, silent otherwise (tests,
pipes, CI); False -> silent; a callable -> called as fn(phase, done, total) (notebooks, the Python API)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

Tick = Callable[[int, int], None]


class Reporter:
    def __init__(self, spec: Any = None) -> None:
        self.callback: Callable[[str, int, int], None] | None = spec if callable(spec) else None
        self._rich: Any = None
        if spec is None and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), transient=True)

    @contextlib.contextmanager
    def task(self, phase: str, total: int) -> Iterator[Tick | None]:
        """A tick function for one phase (None when silent, so callers skip the work of reporting)."""
        if self._rich is None and self.callback is None:
            yield None
            return
        tid = None
        if self._rich is not None:
            if not self._rich.live.is_started:
                self._rich.start()
            tid = self._rich.add_task(phase, total=total)

        def tick(done: int, of: int) -> None:
            if tid is not None:
                self._rich.update(tid, completed=done, total=of)
            if self.callback is not None:
                self.callback(phase, done, of)
        try:
            yield tick
        finally:
            if tid is not None:
                self._rich.remove_task(tid)

    def close(self) -> None:
        if self._rich is not None and self._rich.live.is_started:
            self._rich.stop()
