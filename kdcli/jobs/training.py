"""`kdcli distill` and `kdcli train`: set a run up, train it through the recipe's stages, finish it.

prepare() resolves and checks everything before the first step (models, data, preprocessing, the plan);
train() runs the stages, checkpointing every epoch, and turns a stop signal into Interrupted;
finish() writes the student, assesses it, writes the report and applies the quality gate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcli.data import DataConfig, DataSource, EvalView, TrainView, auto_workers, eval_loader, open_data
from kdcli.errors import Interrupted, KdcliError, SignalReceived
from kdcli.evaluation.assess import Subject, assess, run_info
from kdcli.evaluation.gate import check_gate_options, enforce, gate_result
from kdcli.evaluation.report import stage_entry, stamp, write_report
from kdcli.fsio import write_text
from kdcli.jobs.common import probe, resolve_device, subject
from kdcli.jobs.outputs import RECIPE_NAME, Outputs, public
from kdcli.jobs.plan import ModelChoices, TeacherCheck, build_plan, check_teacher, resolve_models
from kdcli.jobs.resume import check_same_run, identity, open_resume
from kdcli.models.checkpoint import LoadedModel, save_timm_folder
from kdcli.models.preprocessing import recipe_layer, teacher_input
from kdcli.training.cache import OutputCache
from kdcli.training.cache import resolve as resolve_cache
from kdcli.training.engine import Listener, StopRequested, Term, TrainingData
from kdcli.training.pipeline import Checkpoint, Models, StageOutcome, check_plan, restore_models, run_stages
from kdcli.training.recipe import Recipe
from kdcli.training.sources import identity as identity_input
from kdcli.training.trainstate import CHECKPOINT_NAME, StopSignals, restoring


@dataclass
class Run:
    """Everything a training run resolved before its first step."""

    kind: str  # "distill" or "train"
    recipe: Recipe
    out: Path
    device: torch.device
    source: DataSource
    student: LoadedModel
    config: DataConfig  # the student's preprocessing
    teacher: LoadedModel | None
    teacher_config: DataConfig | None  # the teacher's own preprocessing
    baseline: Subject | None
    models: Models
    all_terms: list[list[Term]]
    data: TrainingData
    checkpoint: Checkpoint
    min_top1: float | None
    max_drop: float | None
    started: float
    teacher_check: TeacherCheck | None = None  # the teacher's validation predictions, reused by the report
    plan: dict | None = None
    cache: OutputCache | None = None  # stored outputs of the frozen sources (--cache)

    @property
    def student_folder(self) -> Path:
        return self.out / "student" if self.kind == "distill" else self.out


def train_student(recipe: Recipe, student_ref: str, data_spec: str, out: Path, *, listener: Listener,
                  force: bool = False, resume: bool = False, **options) -> dict:
    """distill (with teacher_ref) or train (without): the whole run. Its files are written beside --out and
    moved into place when it succeeds (jobs/outputs.py); a run that stops keeps what --resume needs. A dry run
    writes nothing and returns the run plan."""
    if options.get("dry_run"):
        folder = Outputs(Path(out)).folder if resume else Path(out)  # where a resumed run's state is
        return prepare(recipe, student_ref, data_spec, folder, resume=resume, **options).plan
    inputs = {"teacher": options.get("teacher_ref"), "baseline": options.get("baseline_ref"), "student": student_ref}
    with Outputs(Path(out), force=force, resume=resume, data=data_spec, inputs=inputs, in_place=("student",),
                 phase="checking the inputs") as outputs:
        run = prepare(recipe, student_ref, data_spec, outputs.folder, resume=resume, **options)
        outputs.phase = "training"
        outcomes = train(run, listener)
        outputs.phase = "writing and evaluating the student"
        report = finish(run, outcomes)
    enforce(report)
    return report


def prepare(
    recipe: Recipe,
    student_ref: str,
    data_spec: str,
    out: Path,
    *,
    teacher_ref: str | None = None,
    teacher_arch: str | None = None,
    student_arch: str | None = None,
    choices: ModelChoices | None = None,
    device_name: str = "auto",
    resume: bool = False,
    kind: str = "distill",
    baseline_ref: str | None = None,
    baseline_arch: str | None = None,
    min_top1: float | None = None,
    max_drop: float | None = None,
    dry_run: bool = False,
    show_plan=None,
    workers: int | str | None = None,
    cache: str = "auto",
) -> Run:
    """Load and check models, data and recipe; check the teacher on the validation split; build the run plan
    (shown through show_plan before training); open the checkpoint to resume from. out: the folder the run
    writes in (its staging folder). workers (an int or "auto") overrides the recipe's data.workers; cache is
    --cache off|auto|DIR."""
    started = time.perf_counter()
    choices = choices or ModelChoices(teacher_arch, student_arch)
    check_gate_options(min_top1, max_drop, teacher_ref is not None)
    cache_folder = resolve_cache(cache, recipe.data.views)
    device = resolve_device(device_name)
    tensors, state = open_resume(out) if resume else ({}, None)
    source = open_data(data_spec)
    if len(source.train) < 2:
        raise KdcliError(f"the training split of {data_spec} has {len(source.train)} image; training needs at least 2 "
                         "(batch norm cannot train on a batch of one); add images")
    settings = recipe.data
    from_recipe = recipe_layer(settings.image_size, settings.mean, settings.std)
    resolved = resolve_models(student_ref, teacher_ref, source, choices, from_recipe, recipe.seed)
    teacher, student, config = resolved.teacher, resolved.student, resolved.student_pre.config
    fingerprint = {
        "kind": kind, "recipe": recipe.to_dict(), "data": source.description, "data_identity": source.identity,
        "teacher": identity(teacher, teacher_ref), "student": identity(student, student_ref),
    }
    if state is not None:  # before the teacher check: other inputs are the likelier and cheaper mistake
        check_same_run(out, state["fingerprint"], fingerprint)
    baseline = subject(baseline_ref, baseline_arch, "baseline", "--baseline-arch", source) if baseline_ref else None
    view = TrainView(source.train, config, settings.augment.hflip, settings.augment.crop, recipe.seed,
                     settings.views)
    workers = settings.workers if workers is None else workers
    workers = auto_workers(view) if workers == "auto" else int(workers)
    student.model.to(device)
    probe(student, config.image_size, "student", device)
    teacher_config, adapter, check = None, None, None
    if teacher:
        teacher_config = resolved.teacher_pre.config
        teacher.model.to(device).eval().requires_grad_(False)
        probe(teacher, teacher_config.image_size, "teacher", device)
        check = check_teacher(teacher, resolved.teacher_pre, source, device, settings.eval_batch_size,
                              workers, choices.allow_weak_teacher)
        adapter = teacher_input(config, teacher_config)
    data = TrainingData(
        view=view, val_loader=eval_loader(EvalView(source.val, config), settings.eval_batch_size, workers),
        batch_size=settings.batch_size, workers=workers, seed=recipe.seed,
    )
    teacher_in = adapter.to(device) if adapter is not None else identity_input
    models = Models(student.model, resolved.started_from_weights, teacher.model if teacher else None,
                    config.image_size, teacher_in)
    all_terms = check_plan(recipe, models)
    plan = build_plan(kind, recipe, source, resolved, student_ref, teacher_ref, check, data.view, device)
    stored = OutputCache(cache_folder, view, device, settings.eval_batch_size) if cache_folder else None
    plan["pipeline"] = pipeline_entry(view, workers, cache_folder)
    if show_plan is not None and not dry_run:
        show_plan(plan)
    checkpoint = Checkpoint(out / CHECKPOINT_NAME, fingerprint, tensors=tensors, state=state)
    if checkpoint.resuming:
        with restoring(checkpoint.path):
            restore_models(checkpoint, models, all_terms)
    return Run(kind, recipe, out, device, source, student, config, teacher, teacher_config, baseline, models,
               all_terms, data, checkpoint, min_top1, max_drop, started, check, plan, stored)


def pipeline_entry(view: TrainView, workers: int, cache: Path | None) -> dict:
    """How the training images are served, for the run plan."""
    pixels = view.pixels
    return {
        "decoded": f"once, in memory ({pixels.bytes / 2**20:.0f} MiB)" if pixels.in_memory else
                   f"from the files every step ({pixels.bytes / 2**20:.0f} MiB would not fit in memory)",
        "workers": workers,
        "views": f"{view.views} fixed per image" if view.views else "fresh every epoch",
        "cache": str(cache) if cache else "off",
    }


def train(run: Run, listener: Listener) -> list[StageOutcome]:
    """Run the stages; SIGINT/SIGTERM save the state and end in Interrupted."""
    if not run.checkpoint.resuming:
        write_text(run.out / RECIPE_NAME, run.recipe.to_yaml())
    with StopSignals() as signals:
        run.checkpoint.stop_requested = signals.requested
        try:
            outcomes = run_stages(run.recipe, run.all_terms, run.models, run.data, run.device, listener,
                                  run.checkpoint, run.cache)
        except StopRequested as stop:
            where = run.recipe.stages[stop.position.stage].name
            raise Interrupted(
                f"stopped in stage '{where}' at epoch {stop.position.epoch + 1}, step {stop.position.step + 1}; "
                f"training state saved in {run.checkpoint.path}"
            ) from None
    if signals.received is not None:  # arrived after the last step: the state is saved, the outputs are not
        raise SignalReceived(signals.received)
    return outcomes


def finish(run: Run, outcomes: list[StageOutcome]) -> dict:
    """Write the student, assess it, write the report (the training checkpoint goes when the outputs are moved
    into place)."""
    folder = run.student_folder
    save_timm_folder(folder, run.student, run.config, run.source.classes, {"recipe_hash": run.recipe.digest()})
    teacher = None
    if run.teacher:
        check = run.teacher_check
        teacher = Subject(run.teacher, run.teacher_config, run.teacher.weights_path, (check.logits, check.labels))
    settings = run.recipe.data
    evaluation = assess(run.source, run.device, settings.eval_batch_size, run.data.workers,
                        Subject(run.student, run.config, folder / "model.safetensors"), teacher, run.baseline)
    for entry in (evaluation["student"], evaluation["teacher"], evaluation["baseline"]):
        if entry and entry["path"]:  # where the files will be when the run is moved into place
            entry["path"] = str(public(entry["path"]))
    evaluation["student"]["init"] = run.student.init
    report = stamp({
        "kind": run.kind,
        "run": run_info(run.device, run.source, run.config, time.perf_counter() - run.started, run.recipe.seed),
        "recipe": {"name": run.recipe.name, "hash": run.recipe.digest(), "resolved": run.recipe.to_dict()},
        "stages": [stage_entry(o) for o in outcomes],
        **evaluation,
        "plan": run.plan,
    })
    report["gate"] = gate_result(report, run.min_top1, run.max_drop)
    return write_report(run.out, report)
