"""What a training run shows a person: one-line summaries on stderr, and a progress bar when
stderr is a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


class Log:
    """One-line summaries on stderr and a rich progress bar when stderr is a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        from rich.console import Console

        self.console = Console(stderr=True)

    def __call__(self, message: str) -> None:
        if not self.quiet:  # whole lines: rich would wrap at 80 columns when stderr is a file or a pipe
            self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    @contextlib.contextmanager
    def progress(self, total: int) -> Iterator[Bar]:
        bar = Bar(total, self.console, enabled=not self.quiet and sys.stderr.isatty())
        try:
            yield bar
        finally:
            bar.close()


class Bar:
    def __init__(self, total: int, console: Any, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.task: Any = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
                                     transient=True)
            self.progress.start()

    def start_epoch(self, epoch: int, window: int) -> None:
        if self.enabled:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task("", total=self.total, completed=window, epoch=epoch + 1, info="")

    def advance(self, *, tokens: int, seconds: float, epoch_tokens: int, ppl: float, lr: float,
                left: float | None) -> None:
        if self.enabled and self.task is not None:
            info = f"{epoch_tokens / max(seconds, 1e-9):,.0f} tok/s  ppl {ppl:,.1f}  lr {lr:.3g}"
            if left is not None:
                info += f"  budget left {max(left, 0) / 60:.1f} min"
            self.progress.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
