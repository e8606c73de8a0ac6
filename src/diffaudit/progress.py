"""One progress bar style for all long work (rich), off when not wanted (tests, non-interactive logs)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def update(self, completed: int | None = None, advance: int | None = None, info: str | None = None) -> None:
        if self._progress is None or self._task is None:
            return
        fields = {} if info is None else {"info": info}
        self._progress.update(self._task, completed=completed, advance=advance, **fields)


@contextlib.contextmanager
def progress_bar(description: str, total: int, completed: int = 0, enabled: bool = True) -> Iterator[_Bar]:
    """A bar on stderr with count, elapsed and remaining time and a free ``info`` text (loss, images/s)."""
    if not enabled:
        yield _Bar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield _Bar(progress, task)
