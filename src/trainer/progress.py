"""A rich progress bar and log lines for the logging rank; silent elsewhere."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def format_record(rec: dict[str, Any]) -> str:
    parts = [f"step {rec['step']}"]
    for key, fmt in (
        ("loss", "{:.4f}"),
        ("eval_loss", "{:.4f}"),
        ("lr", "{:.2e}"),
        ("grad_norm", "{:.3f}"),
        ("tokens_per_s", "{:.0f}"),
        ("peak_mem_mib", "{:.0f}"),
        ("mfu", "{:.1%}"),
    ):
        if key in rec:
            parts.append(f"{key} " + fmt.format(rec[key]))
    return " | ".join(parts)


class Progress:
    def __init__(self, total: int, enabled: bool, completed: int = 0):
        self.enabled = enabled
        self.console = Console(stderr=False, highlight=False)
        self._bar = RichProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self._task = self._bar.add_task("train", total=total, completed=completed, loss="-")

    def __enter__(self) -> Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def advance(self, loss: float) -> None:
        self._bar.update(self._task, advance=1, loss=f"{loss:.4f}")

    def log(self, rec: dict[str, Any]) -> None:
        self.print(format_record(rec))

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, soft_wrap=True)
