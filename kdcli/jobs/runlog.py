"""The run's metrics as training goes: metrics.jsonl and metrics.csv (one row per epoch), optionally TensorBoard.

A listener beside the progress display (engine.Listener). Rows are written when each epoch ends, in the run's
folder; a resumed run starts the files again from the epochs its checkpoint holds, so they never repeat a row."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from kdcli.errors import KdcliError
from kdcli.fsio import strict, write_text
from kdcli.training.engine import EpochRecord, StagePlan

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
LOGGERS = ("tensorboard",)
TAGS = {"loss": "loss/total", "val_top1": "val/top1", "lr": "train/lr", "images_per_s": "train/images_per_s"}


def check_loggers(log: list[str] | None) -> list[str]:
    """--log values: known names, and their package installed (before any work starts)."""
    names = [name.strip() for value in log or [] for name in value.split(",") if name.strip()]
    for name in names:
        if name not in LOGGERS:
            raise KdcliError(f"--log {name}: unknown logger; choose from {', '.join(LOGGERS)} (metrics.jsonl and "
                             "metrics.csv are always written)")
    if "tensorboard" in names:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise KdcliError("--log tensorboard: the tensorboard package is not installed; pip install "
                             "'kdcli[tensorboard]' (or pip install tensorboard)") from None
    return names


def metrics_row(stage_index: int, global_epoch: int, record: EpochRecord) -> dict:
    """One epoch: where it is, every loss term, val top-1, lr, throughput and time."""
    return {
        "stage": stage_index + 1,
        "stage_name": record.stage,
        "epoch": record.epoch,
        "epochs": record.epochs,
        "global_epoch": global_epoch,
        "loss": record.train_loss,
        **{f"loss/{name}": value for name, value in record.terms.items()},
        "val_top1": record.val_top1,
        "lr": record.lr,
        "images_per_s": record.images_per_s,
        "seconds": record.seconds,
    }


class RunLog:
    """Writes a row per epoch to metrics.jsonl and metrics.csv in `folder` (and TensorBoard scalars under
    folder/tensorboard/ with --log tensorboard). earlier: (stage index, record) of the epochs already run."""

    def __init__(self, folder: Path, earlier: list[tuple[int, EpochRecord]] = (), loggers: list[str] = ()):
        self.folder = Path(folder)
        self.rows = [metrics_row(stage, n + 1, record) for n, (stage, record) in enumerate(earlier)]
        self.stage = 0
        self.writer = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder / TENSORBOARD_DIR), purge_step=len(self.rows) + 1)
        write_text(self.folder / METRICS_JSONL, "".join(_json_line(row) for row in self.rows))
        self._write_csv()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()

    def stage_started(self, plan: StagePlan, steps_per_epoch: int) -> None:
        self.stage = plan.index

    def steps_done(self, steps: list[tuple[int, float]]) -> None:
        return None

    def epoch_done(self, record: EpochRecord) -> None:
        row = metrics_row(self.stage, len(self.rows) + 1, record)
        self.rows.append(row)
        path = self.folder / METRICS_JSONL
        try:
            with open(path, "a", encoding="utf-8") as jsonl:  # appended, so that `tail -f` follows it
                jsonl.write(_json_line(row))
        except OSError as err:
            raise KdcliError(f"cannot write {path}: {err.strerror or err}; free space or choose another --out") from err
        self._write_csv()
        if self.writer is not None:
            for key, value in row.items():
                tag = key if key.startswith("loss/") else TAGS.get(key)
                if tag and value is not None:
                    self.writer.add_scalar(tag, value, row["global_epoch"])
            self.writer.flush()

    def _write_csv(self) -> None:
        """Rewritten whole each epoch: a stage that adds a term adds a column."""
        rows = strict(self.rows)
        columns = list(dict.fromkeys(key for row in rows for key in row))  # every term any stage has
        table = io.StringIO()
        writer = csv.DictWriter(table, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.folder / METRICS_CSV, table.getvalue())


def _json_line(row: dict) -> str:
    return json.dumps(strict(row)) + "\n"


class Listeners:
    """Several listeners heard as one (the progress display and the run log)."""

    def __init__(self, *listeners):
        self.listeners = listeners

    def stage_started(self, plan: StagePlan, steps_per_epoch: int) -> None:
        for listener in self.listeners:
            listener.stage_started(plan, steps_per_epoch)

    def steps_done(self, steps: list[tuple[int, float]]) -> None:
        for listener in self.listeners:
            listener.steps_done(steps)

    def epoch_done(self, record: EpochRecord) -> None:
        for listener in self.listeners:
            listener.epoch_done(record)
