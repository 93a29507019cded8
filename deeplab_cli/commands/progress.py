"""The one progress bar of the CLI (segment, eval, crf tune): rich on stderr when it is a terminal.

``with ProgressBar("segment", quiet=quiet) as bar:`` then ``bar.start(total)`` once the count is known,
``bar.advance()`` per item done, and ``bar.say(line)`` for a message on stderr (printed above the bar
while it is shown, plainly otherwise). Without a terminal, or with ``quiet``, it draws nothing.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class ProgressBar:
    """A transient ``label [bar] done/total eta`` line on stderr (see the module docstring)."""

    def __init__(self, label: str, quiet: bool = False, total: int | None = None) -> None:
        self.label = label
        self.enabled = not quiet and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._initial_total = total

    def __enter__(self) -> ProgressBar:
        if self._initial_total is not None:
            self.start(self._initial_total)
        return self

    def start(self, total: int) -> None:
        """Show the bar for ``total`` items (no-op when disabled or already shown)."""
        if not self.enabled or self._progress is not None:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self._progress = Progress(*columns, console=Console(stderr=True), transient=True)
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=total)

    def advance(self, count: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, count)

    def say(self, line: str) -> None:
        """One line on stderr, above the bar while it is shown."""
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            click.echo(line, err=True)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
