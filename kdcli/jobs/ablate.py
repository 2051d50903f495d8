"""`kdcli ablate`: the paper's ablation on the user's teacher, student and data, one command.

Every cell of kdcli.training.ablation is run for every seed as an ordinary `distill` (or, for the student alone,
`train`) run in its own folder, OUT/<cell>/seed-<s>. A finished run (its report.json) is reused, an interrupted
one (its training state, kept beside that folder by jobs/outputs.py) resumed, so running the same command again continues where it stopped. The table is the
mean ± standard deviation of the cells' validation top-1 over the seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kdcli.errors import KdcliError, close_matches
from kdcli.evaluation.ablation import summarise, write_ablation_report
from kdcli.fsio import write_json
from kdcli.jobs.outputs import Outputs
from kdcli.jobs.plan import ModelChoices
from kdcli.jobs.training import train_student
from kdcli.training.ablation import Cell, build_cells, stage_count_rows
from kdcli.training.recipe import Recipe

MARKER = "ablation.json"  # what the folder is an ablation of; a rerun must match it


@dataclass
class AblationInputs:
    teachers: list[str]
    teacher_weights: list[float] | None
    student: str
    data: str
    base: Recipe
    seeds: int
    epochs: int | None
    choices: ModelChoices
    init_from_teacher: bool = False
    only: list[str] | None = None  # run only these cells

    def identity(self) -> dict:
        return {"teachers": [_located(t) for t in self.teachers], "teacher_weights": self.teacher_weights,
                "student": _located(self.student), "data": _located(self.data), "recipe": _what_runs(self.base),
                "epochs": self.epochs, "init_from_teacher": self.init_from_teacher}


def _located(ref):
    """A local file or folder by its absolute path (the same teacher named from another folder is the same);
    anything else (an architecture, hf-hub:, synthetic) as given."""
    return str(Path(ref).resolve()) if isinstance(ref, str) and Path(ref).exists() else ref


def _what_runs(recipe: Recipe) -> str:
    """The recipe's hash without its description, which changes nothing a cell runs."""
    return recipe.model_copy(update={"description": ""}).digest()


def _open_out(out: Path, inputs: AblationInputs, force: bool) -> None:
    """A new folder, or one holding an ablation of the same inputs (reused cell by cell); --force: any folder."""
    marker = out / MARKER
    if out.exists() and not out.is_dir():
        raise KdcliError(f"--out {out} is a file; pass a folder")
    if marker.is_file() and not force:
        saved = json.loads(marker.read_text(encoding="utf-8"))
        now = inputs.identity()
        saved = {**saved, "teachers": [_located(t) for t in saved.get("teachers") or []],
                 "student": _located(saved.get("student")), "data": _located(saved.get("data"))}
        for key in now:
            if saved.get(key) != now[key]:
                raise KdcliError(f"--out {out} holds an ablation with another {key} ({saved.get(key)} then, "
                                 f"{now[key]} now); pass the same inputs to continue it, or choose a new --out")
        return
    if out.is_dir() and any(out.iterdir()) and not force:
        raise KdcliError(f"--out {out} is not empty and holds no ablation; choose a new folder, or pass --force")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KdcliError(f"--out {out}: cannot write there ({err.strerror}); choose another folder") from err
    write_json(marker, inputs.identity())


def _chosen(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    if not only:
        return cells
    names = [cell.name for cell in cells]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise KdcliError(f"--cells: no cell '{unknown[0]}'{close_matches(unknown[0], names)}; the cells of this "
                         f"ablation are {', '.join(names)}")
    return [cell for cell in cells if cell.name in only]


def _cell_run(cell: Cell, folder: Path, inputs: AblationInputs, device: str, force: bool, listener) -> dict:
    """The cell's report: read when the run finished before (unless force), else trained (resumed from its
    checkpoint unless force)."""
    report_path = folder / "report.json"
    if report_path.is_file() and not force:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        if report.get("recipe", {}).get("hash") != cell.recipe.digest():
            raise KdcliError(f"{folder} holds a finished run of another recipe than cell '{cell.name}' would run; "
                             "delete that folder, or choose a new --out")
        return report
    distill = cell.kind == "distill"
    teachers = inputs.teachers if cell.all_teachers else inputs.teachers[:1]
    options = {"teacher_ref": teachers[0]} if distill else {}
    if distill and len(teachers) > 1:
        options.update(extra_teachers=teachers[1:], teacher_weights=inputs.teacher_weights)
    if inputs.init_from_teacher:  # the student alone starts from the teacher too: the comparison stays fair
        options.update(init_from=inputs.teachers[0])
    resume = not force and Outputs(folder).resumable  # its training state, kept beside the folder
    return train_student(cell.recipe, inputs.student, inputs.data, folder, listener=listener, kind=cell.kind,
                         choices=inputs.choices, device_name=device, resume=resume, force=force or folder.is_dir(),
                         **options)


def run_ablation(inputs: AblationInputs, out: Path, device: str = "auto", force: bool = False, progress=None,
                 show=None) -> dict:
    """Run (or reuse) every cell for every seed; write report.json, report.md and ablation.png into out.
    progress(label) -> a listener context manager; show(line) is told which run starts."""
    seeds = [inputs.base.seed + i for i in range(inputs.seeds)]
    cells_by_seed = {seed: _chosen(build_cells(inputs.base, inputs.epochs, seed, len(inputs.teachers)), inputs.only)
                     for seed in seeds}
    if inputs.init_from_teacher and inputs.choices.student_arch:
        raise KdcliError("--init-from-teacher starts the student from the teacher; drop --student-arch")
    _open_out(Path(out), inputs, force)
    runs: dict[str, list[tuple[int, dict]]] = {}
    for seed in seeds:
        for cell in cells_by_seed[seed]:
            folder = Path(out) / cell.name / f"seed-{seed}"
            if show is not None:
                show(f"ablate: cell '{cell.name}' ({cell.schedule} epochs), seed {seed} -> {folder}")
            with progress(f"{cell.name}/{seed}") as listener:
                report = _cell_run(cell, folder, inputs, device, force, listener)
            runs.setdefault(cell.name, []).append((seed, report))
    cells = cells_by_seed[seeds[0]]
    summary = summarise(cells, runs, stage_count_rows(cells, inputs.base), inputs, seeds)
    return write_ablation_report(Path(out), summary)
