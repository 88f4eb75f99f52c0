"""Progress output for runs: a rich progress bar on a terminal, one line per epoch everywhere."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    """Shows batches done, loss per layer and samples/s; prints an epoch line with the evaluation."""

    def __init__(self, total_batches: int, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.enabled = enabled
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled or not self.console.is_terminal,
        )
        self._task = self._bar.add_task("train", total=total_batches, status="")

    def __enter__(self) -> RunProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def set_total(self, total: int) -> None:
        self._bar.update(self._task, total=total)

    def advance(self, n: int = 1) -> None:
        self._bar.advance(self._task, n)

    def status(self, losses: list[float], samples_per_s: float, epoch: int) -> None:
        loss_text = " ".join(f"{v:.3f}" for v in losses)
        self._bar.update(self._task, description=f"epoch {epoch}", status=f"loss [{loss_text}] {samples_per_s:,.0f}/s")

    def log(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)
