"""Progress display for long host-side work (rich), silent when output is not a terminal."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Steps:
    """A progress bar over named pipeline steps, with elapsed time per step."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.timings: dict[str, float] = {}
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                  console=self.console, transient=False, disable=not enabled)
        self._task = self._progress.add_task("starting", total=total)

    def __enter__(self) -> Steps:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        self._progress.update(self._task, description=description)
        t = time.perf_counter()
        yield
        self.timings[description] = time.perf_counter() - t
        self._progress.advance(self._task)
