"""Training progress on stderr: rich bars on a terminal, one plain line per epoch otherwise (CI logs)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kdcli.training.engine import EpochRecord, StagePlan


def _epoch_line(record: EpochRecord) -> str:
    terms = " ".join(f"{name} {value:.4f}" for name, value in record.terms.items())
    return (
        f"[{record.stage}] epoch {record.epoch}/{record.epochs}  loss {record.train_loss:.4f} ({terms})  "
        f"val top-1 {record.val_top1:.2f}%  lr {record.lr:.2e}  {record.seconds:.1f}s"
    )


class PlainProgress:
    """One line per stage start and per epoch, flushed, no escape codes."""

    def __init__(self, label: str = ""):
        self.label = f"{label}: " if label else ""

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def stage_started(self, plan: StagePlan, steps_per_epoch: int) -> None:
        terms = ", ".join(f"{term.weight:g}×{term.name}" for term in plan.terms)
        reads = f" (reads {', '.join(plan.sources)})" if plan.sources else ""
        print(f"{self.label}stage {plan.index} '{plan.name}': {plan.epochs} epochs of {terms}{reads}",
              file=sys.stderr, flush=True)

    def step_done(self) -> None:
        return None

    def epoch_done(self, record: EpochRecord) -> None:
        print(f"{self.label}{_epoch_line(record)}", file=sys.stderr, flush=True)


class RichProgress(PlainProgress):
    """A live bar per stage; epoch lines printed above it."""

    def __init__(self, label: str = ""):
        super().__init__(label)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=False,
        )
        self.task = None

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def stage_started(self, plan: StagePlan, steps_per_epoch: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"{self.label}{plan.name}", total=steps_per_epoch * plan.epochs)

    def step_done(self) -> None:
        self.progress.advance(self.task)

    def epoch_done(self, record: EpochRecord) -> None:
        self.progress.console.print(f"{self.label}{_epoch_line(record)}", markup=False, highlight=False)


def progress_for_terminal(label: str = "") -> PlainProgress:
    return RichProgress(label) if sys.stderr.isatty() else PlainProgress(label)
