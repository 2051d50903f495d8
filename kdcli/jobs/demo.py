"""`kdcli demo`: the whole product on the built-in synthetic data, no files, no downloads.

Trains a teacher, trains the student alone as a baseline, distills the same student with the default
recipe for the same number of epochs (its report compares it with the teacher and the baseline), and returns
the three reports side by side.
"""

from __future__ import annotations

from pathlib import Path

from kdcli.jobs.outputs import Outputs
from kdcli.jobs.plan import ModelChoices
from kdcli.jobs.training import train_student
from kdcli.training.recipe import DEFAULT_RECIPE, load_recipe

TEACHER = "resnet10t"
STUDENT = "test_resnet"
TEACHER_EPOCHS = 7
# The distilled student gets exactly the baseline's epochs, split over the default recipe's stages.
STAGE_EPOCHS = (5, 1, 1)


def run_demo(out: Path, data: str, teacher_arch: str, student_arch: str, device: str, force: bool,
             progress) -> dict[str, dict]:
    """progress(label) -> a listener context manager; returns the reports of teacher, baseline, distilled."""
    supervised = "supervised"
    runs = {
        "teacher": (load_recipe(supervised, [f"stages.0.epochs={TEACHER_EPOCHS}"]), teacher_arch, None, "train"),
        "baseline": (load_recipe(supervised, [f"stages.0.epochs={sum(STAGE_EPOCHS)}"]), student_arch, None, "train"),
        "distilled": (
            load_recipe(DEFAULT_RECIPE, [f"stages.{i}.epochs={e}" for i, e in enumerate(STAGE_EPOCHS)]),
            student_arch, "teacher", "distill",  # the teacher trained first
        ),
    }
    reports = {}
    with Outputs(Path(out), force=force, data=data, phase="running the demo") as outputs:  # all three, or none
        folder = outputs.folder
        for label, (recipe, arch, teacher, kind) in runs.items():
            baseline = str(folder / "baseline") if label == "distilled" else None  # the distilled report compares
            with progress(label) as listener:
                # the demo trains its own teacher: on tiny --data it may be weak, and the demo still shows the rest
                reports[label] = train_student(recipe, arch, data, folder / label, device_name=device,
                                               listener=listener, kind=kind, baseline_ref=baseline,
                                               teacher_ref=str(folder / teacher) if teacher else None,
                                               choices=ModelChoices(allow_weak_teacher=True))
    return reports
