"""Progress on stderr: rich bars on a terminal, plain flushed lines otherwise (CI logs), nothing with --quiet.

Every listener hears the stages start, the steps (their images and losses, a few at a time) and each epoch end (engine.Listener), and
the phases of a command outside training (`phase`: the final evaluation and timing)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from kdcli.training.engine import EpochRecord, StagePlan

QUIET, NORMAL, VERBOSE = -1, 0, 1


def _epoch_line(record: EpochRecord) -> str:
    terms = " ".join(f"{name} {value:.4f}" for name, value in record.terms.items())
    speed = f"  {record.images_per_s:.0f} img/s" if record.images_per_s else ""
    return (
        f"[{record.stage}] epoch {record.epoch}/{record.epochs}  loss {record.train_loss:.4f} ({terms})  "
        f"val top-1 {record.val_top1:.2f}%  lr {record.lr:.2e}{speed}  {record.seconds:.1f}s"
    )


def _stage_line(plan: StagePlan) -> str:
    terms = ", ".join(f"{term.weight:g}×{term.name}" for term in plan.terms)
    reads = f" (reads {', '.join(plan.sources)})" if plan.sources else ""
    return f"stage {plan.index + 1}/{plan.stages} '{plan.name}': {plan.epochs} epochs of {terms}{reads}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Silent:
    """--quiet: no progress at all."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def stage_started(self, plan: StagePlan, steps_per_epoch: int) -> None:
        return None

    def steps_done(self, steps: list[tuple[int, float]]) -> None:
        return None

    def epoch_done(self, record: EpochRecord) -> None:
        return None

    def phase(self, text: str) -> None:
        return None


class _Epoch:
    """Running figures of the epoch in progress: steps, images, mean loss, images per second."""

    def __init__(self, steps: int):
        self.steps, self.done, self.images, self.loss_sum = steps, 0, 0, 0.0
        self.started = time.perf_counter()

    def add(self, steps: list[tuple[int, float]]) -> None:
        for images, loss in steps:
            self.done += 1
            self.images += images
            self.loss_sum += loss * images

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.images, 1)

    @property
    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.started, 1e-9)


class PlainProgress(Silent):
    """One line per stage start, per epoch and per phase, flushed, no escape codes. Verbose: also a line about
    every tenth of an epoch (steps, running loss, img/s, time left in the epoch)."""

    def __init__(self, label: str = "", verbose: bool = False):
        self.label = f"{label}: " if label else ""
        self.verbose = verbose
        self.epoch: _Epoch | None = None
        self.steps = 0

    def say(self, text: str) -> None:
        print(f"{self.label}{text}", file=sys.stderr, flush=True)

    def stage_started(self, plan: StagePlan, steps_per_epoch: int) -> None:
        self.steps, self.epoch = steps_per_epoch, _Epoch(steps_per_epoch)
        self.say(_stage_line(plan))

    def steps_done(self, steps: list[tuple[int, float]]) -> None:
        epoch = self.epoch
        every = max(1, epoch.steps // 10)
        before = epoch.done // every
        epoch.add(steps)
        if self.verbose and epoch.done // every > before and epoch.done < epoch.steps:
            left = (epoch.steps - epoch.done) * (time.perf_counter() - epoch.started) / epoch.done
            self.say(f"  step {epoch.done}/{epoch.steps}  loss {epoch.loss:.4f}  {epoch.rate:.0f} img/s  "
                     f"epoch ETA {_clock(left)}")

    def epoch_done(self, record: EpochRecord) -> None:
        self.epoch = _Epoch(self.steps)  # the next one starts now
        self.say(_epoch_line(record))

    def phase(self, text: str) -> None:
        self.say(f"{text} ...")


class _Counted(ProgressColumn):
    """A column shown for a task with a number of steps (a stage), blank for a phase (no total)."""

    def __init__(self, column: ProgressColumn):
        super().__init__()
        self.column = column

    def render(self, task):
        return Text("") if task.total is None else self.column.render(task)


class RichProgress(PlainProgress):
    """A live bar per stage (stage i/n, steps, ETA, img/s, running loss); the stage, epoch and phase lines printed
    above it; a spinner with the elapsed time for a phase."""

    def __init__(self, label: str = "", verbose: bool = False):
        super().__init__(label, verbose)
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _Counted(MofNCompleteColumn()),
            _Counted(TextColumn("ETA")), _Counted(TimeRemainingColumn()), TextColumn("{task.fields[speed]}"),
            TextColumn("{task.fields[loss]}"), TimeElapsedColumn(),
            console=Console(stderr=True), transient=False,
        )
        self.task = None

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def say(self, text: str) -> None:
        self.progress.console.print(f"{self.label}{text}", markup=False, highlight=False, soft_wrap=True)

    def _new_task(self, description: str, total: int | None) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"{self.label}{description}", total=total, speed="", loss="")

    def stage_started(self, plan: StagePlan, steps_per_epoch: int) -> None:
        super().stage_started(plan, steps_per_epoch)
        self._new_task(f"stage {plan.index + 1}/{plan.stages} {plan.name}", steps_per_epoch * plan.epochs)

    def steps_done(self, steps: list[tuple[int, float]]) -> None:
        self.epoch.add(steps)
        self.progress.update(self.task, advance=len(steps), speed=f"{self.epoch.rate:.0f} img/s",
                             loss=f"loss {self.epoch.loss:.4f}")

    def phase(self, text: str) -> None:
        super().phase(text)
        self._new_task(text, None)


def progress_for_terminal(label: str = "", verbosity: int = NORMAL) -> Silent:
    if verbosity <= QUIET:
        return Silent()
    verbose = verbosity >= VERBOSE
    return RichProgress(label, verbose) if sys.stderr.isatty() else PlainProgress(label, verbose)
