"""The training progress bar (rich): step, loss, bpb, tokens/s and time left, on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressBar:
    """A bar over the run's budget: `total` steps, or seconds for a wall-clock budget."""

    def __init__(self, total: float, enabled: bool = True, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(),
            TextColumn("step {task.fields[step]}"), TextColumn("loss {task.fields[loss]:.3f}"),
            TextColumn("bpb {task.fields[bpb]:.3f}"), TextColumn("{task.fields[tokens_per_s]:,.0f} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, step=0, loss=float("nan"), bpb=float("nan"),
                                           tokens_per_s=0.0)

    def __enter__(self) -> "ProgressBar":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, completed: float, **fields) -> None:
        """Move the bar to `completed` (steps or seconds) and refresh the shown numbers."""
        self.progress.update(self.task, completed=completed, **fields)

    def log(self, message: str) -> None:
        """Print a line above the bar."""
        self.progress.console.print(message, highlight=False, markup=False, soft_wrap=True)
