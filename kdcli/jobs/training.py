"""`kdcli distill` and `kdcli train`: set a run up, train it through the recipe's stages, finish it.

prepare() resolves and checks everything before the first step (models, data, preprocessing, the plan);
train() runs the stages, checkpointing every epoch, and turns a stop signal into Interrupted;
finish() writes the student, assesses it, writes the report and applies the quality gate.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcli.data import DataConfig, DataSource, EvalView, Renormalize, TrainView, eval_loader, open_data
from kdcli.errors import Interrupted, KdcliError
from kdcli.evaluation.assess import Subject, assess, model_subject, run_info
from kdcli.evaluation.gate import check_gate_options, enforce, gate_result
from kdcli.evaluation.report import stage_entry, stamp, write_report
from kdcli.fsio import write_text
from kdcli.jobs.common import check_out, probe, resolve_device, subject
from kdcli.jobs.export import check_request, exported_subjects, write_exports
from kdcli.jobs.resume import check_same_run, identity, open_resume
from kdcli.models.checkpoint import LoadedModel, fresh_model, is_checkpoint_ref, load_checkpoint, save_timm_folder
from kdcli.models.preprocessing import own_config, student_data_config
from kdcli.training.engine import Listener, StopRequested, TrainingData
from kdcli.training.pipeline import Checkpoint, Losses, Models, StageOutcome, check_plan, restore_models, run_stages
from kdcli.training.recipe import Recipe
from kdcli.training.trainstate import CHECKPOINT_NAME, StopSignals


@dataclass
class Run:
    """Everything a training run resolved before its first step."""

    kind: str  # "distill" or "train"
    recipe: Recipe
    out: Path
    device: torch.device
    source: DataSource
    student: LoadedModel
    start: LoadedModel | None  # the checkpoint the student started from, if any
    config: DataConfig  # the student's preprocessing
    teacher: LoadedModel | None
    teacher_config: DataConfig | None  # the teacher's own preprocessing
    baseline: Subject | None
    models: Models
    all_losses: list[Losses]
    data: TrainingData
    checkpoint: Checkpoint
    teacher_input: object  # batch prepared for the student -> batch for the teacher
    min_top1: float | None
    max_drop: float | None
    started: float

    @property
    def student_folder(self) -> Path:
        return self.out / "student" if self.kind == "distill" else self.out


def train_student(recipe: Recipe, student_ref: str, data_spec: str, out: Path, *, listener: Listener,
                  export: str | None = None, **options) -> dict:
    """distill (with teacher_ref) or train (without): the whole run; a run that fails before its first
    checkpoint leaves no folder behind. export: formats to export the student to (distill --export)."""
    out = Path(out)
    fresh = not out.exists()
    formats = check_request(export, has_data=True, flag="--export")
    try:
        run = prepare(recipe, student_ref, data_spec, out, **options)
        return finish(run, train(run, listener), formats)
    except KdcliError:
        if fresh and out.is_dir() and not (out / CHECKPOINT_NAME).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def prepare(
    recipe: Recipe,
    student_ref: str,
    data_spec: str,
    out: Path,
    *,
    teacher_ref: str | None = None,
    teacher_arch: str | None = None,
    student_arch: str | None = None,
    device_name: str = "auto",
    force: bool = False,
    resume: bool = False,
    kind: str = "distill",
    baseline_ref: str | None = None,
    baseline_arch: str | None = None,
    min_top1: float | None = None,
    max_drop: float | None = None,
) -> Run:
    """Load and check models, data and recipe; open the checkpoint to resume from (or the out folder)."""
    started = time.perf_counter()
    check_gate_options(min_top1, max_drop, teacher_ref is not None)
    device = resolve_device(device_name)
    tensors, state = open_resume(out) if resume else ({}, None)
    if not resume:
        check_out(out, force)
    teacher = load_checkpoint(teacher_ref, teacher_arch, "teacher", "--teacher-arch") if teacher_ref else None
    source = open_data(data_spec)
    if teacher and teacher.num_classes != source.num_classes:
        raise KdcliError(
            f"the teacher has {teacher.num_classes} classes but the data has {source.num_classes}; "
            "pass the data the teacher was trained on, or a teacher for this data"
        )
    baseline = subject(baseline_ref, baseline_arch, "baseline", "--baseline-arch", source) if baseline_ref else None
    start = load_checkpoint(student_ref, student_arch, "student", "--student-arch") if is_checkpoint_ref(student_ref) else None
    num_classes = teacher.num_classes if teacher else source.num_classes
    if start and start.num_classes != num_classes:
        whose = "the teacher" if teacher else "the data"
        raise KdcliError(
            f"the student has {start.num_classes} classes but {whose} has {num_classes}; "
            "start from a student with the same classes, or from an architecture name"
        )
    arch = start.arch if start else student_ref
    settings = recipe.data
    config = student_data_config(settings.image_size, settings.mean, settings.std, teacher, start, arch,
                                 source.native_size)
    torch.manual_seed(recipe.seed)
    student = start or fresh_model(arch, num_classes, config.image_size)
    student.model.to(device)
    probe(student, config.image_size, "student", device)
    teacher_config, teacher_input = None, (lambda x: x)
    if teacher:
        teacher.model.to(device).eval().requires_grad_(False)
        probe(teacher, config.image_size, "teacher", device)
        teacher_config = own_config(teacher, source.native_size)
        if (teacher_config.mean, teacher_config.std) != (config.mean, config.std):
            teacher_input = Renormalize(config, teacher_config).to(device)
    data = TrainingData(
        view=TrainView(source.train, config, settings.augment.hflip, settings.augment.crop, recipe.seed),
        val_loader=eval_loader(EvalView(source.val, config), settings.eval_batch_size, settings.workers),
        batch_size=settings.batch_size, workers=settings.workers, seed=recipe.seed,
    )
    models = Models(student.model, student.pretrained, teacher.model if teacher else None, config.image_size)
    all_losses = check_plan(recipe, models)
    fingerprint = {
        "kind": kind, "recipe": recipe.to_dict(), "data": source.description,
        "teacher": identity(teacher, teacher_ref), "student": identity(student, student_ref),
    }
    checkpoint = Checkpoint(out / CHECKPOINT_NAME, fingerprint, tensors=tensors, state=state)
    if checkpoint.resuming:
        check_same_run(out, state["fingerprint"], fingerprint)
        restore_models(checkpoint, models, all_losses)
    return Run(kind, recipe, out, device, source, student, start, config, teacher, teacher_config, baseline, models,
               all_losses, data, checkpoint, teacher_input, min_top1, max_drop, started)


def train(run: Run, listener: Listener) -> list[StageOutcome]:
    """Run the stages; SIGINT/SIGTERM save the state and end in Interrupted."""
    if not run.checkpoint.resuming:
        run.out.mkdir(parents=True, exist_ok=True)
        write_text(run.out / "recipe.yaml", run.recipe.to_yaml())
    with StopSignals() as signals:
        run.checkpoint.stop_requested = signals.requested
        try:
            return run_stages(run.recipe, run.all_losses, run.models, run.data, run.device, listener, run.checkpoint,
                              teacher_input=run.teacher_input)
        except StopRequested as stop:
            where = run.recipe.stages[stop.position.stage].name
            raise Interrupted(
                f"stopped in stage '{where}' at epoch {stop.position.epoch + 1}, step {stop.position.step + 1}; "
                f"training state saved in {run.checkpoint.path}"
            ) from None


def finish(run: Run, outcomes: list[StageOutcome], export_formats: list[str] = ()) -> dict:
    """Write the student (and its exports), assess them, write the report, delete the training checkpoint, apply
    the gate (to the student and every exported file)."""
    folder = run.student_folder
    save_timm_folder(folder, run.student, run.config, run.source.classes, {"recipe_hash": run.recipe.digest()})
    exported = write_exports(run.student, run.config, run.source, run.source.classes, export_formats,
                             run.out / "export", run.recipe.seed) if export_formats else []
    teacher = model_subject(run.teacher, run.teacher_config, run.teacher.weights_path) if run.teacher else None
    settings = run.recipe.data
    evaluation = assess(run.source, run.device, settings.eval_batch_size, settings.workers,
                        model_subject(run.student, run.config, folder / "model.safetensors"), teacher, run.baseline,
                        exported_subjects(exported, run.source.native_size))
    evaluation["student"]["init"] = str(run.start.weights_path) if run.start else "random"
    report = stamp({
        "kind": run.kind,
        "run": run_info(run.device, run.source, run.config, time.perf_counter() - run.started, run.recipe.seed),
        "recipe": {"name": run.recipe.name, "hash": run.recipe.digest(), "resolved": run.recipe.to_dict()},
        "stages": [stage_entry(o) for o in outcomes],
        **evaluation,
    })
    report["gate"] = gate_result(report, run.min_top1, run.max_drop)
    report = write_report(run.out, report)
    run.checkpoint.path.unlink()  # the run is complete: its outputs replace the training state
    enforce(report)
    return report
