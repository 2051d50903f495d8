"""What identifies a run, so that --resume continues only the run that was interrupted."""

from __future__ import annotations

from pathlib import Path

from kdcli.errors import KdcliError
from kdcli.models.checkpoint import LoadedModel
from kdcli.training.trainstate import CHECKPOINT_NAME, file_digest, first_difference, read_checkpoint


def identity(loaded: LoadedModel | None, ref: str | None) -> str | None:
    """What must not change between a run and its resumption: weights contents, or the architecture."""
    if loaded is None:
        return None
    return f"sha256:{file_digest(loaded.weights_path)[:16]}" if loaded.weights_path else f"arch:{ref}"


def check_same_run(out: Path, saved: dict, now: dict) -> None:
    """Refuse to resume with other inputs than the interrupted run's, saying what differs."""
    labels = {"kind": "the command differs", "data": "the data differs", "teacher": "the teacher's weights differ",
              "student": "the starting student differs"}
    for key, label in labels.items():
        if saved.get(key) != now.get(key):
            raise KdcliError(
                f"cannot resume {out}: {label} from the interrupted run's "
                f"({saved.get(key)} then, {now.get(key)} now); rerun with its inputs, or start afresh with --force"
            )
    difference = first_difference(saved["recipe"], now["recipe"])
    if difference:
        raise KdcliError(
            f"cannot resume {out}: the recipe differs at {difference}; rerun with --recipe {out / 'recipe.yaml'} "
            "(the recipe it ran), or start afresh with --force"
        )


def open_resume(out: Path) -> tuple[dict, dict]:
    """(tensors, state) of the interrupted run in out."""
    path = Path(out) / CHECKPOINT_NAME
    if not path.is_file():
        reason = "it holds a finished run" if (Path(out) / "report.json").is_file() else "there is no checkpoint"
        raise KdcliError(f"nothing to resume in {out}: {reason}; drop --resume to start a run")
    return read_checkpoint(path)
