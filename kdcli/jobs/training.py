"""`kdcli distill` and `kdcli train`: set a run up, train it through the recipe's stages, finish it.

prepare() resolves and checks everything before the first step (models, data, preprocessing, the plan);
train() runs the stages, checkpointing every epoch, and turns a stop signal into Interrupted;
finish() writes the student, assesses it, writes the report and applies the quality gate.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol
from pathlib import Path

import torch

from kdcli import distributed
from kdcli.data import DataConfig, DataSource, EvalView, TrainView, auto_workers, eval_loader, open_data
from kdcli.errors import Interrupted, KdcliError, SignalReceived
from kdcli.evaluation.assess import Subject, assess, model_subject, run_info
from kdcli.evaluation.gate import check_gate_options, enforce, gate_result
from kdcli.evaluation.report import stage_entry, stamp, write_report
from kdcli.fsio import write_text
from kdcli.jobs.common import probe, resolve_device, subject
from kdcli.jobs.export import check_request, exported_subjects, write_exports
from kdcli.jobs.outputs import RECIPE_NAME, Outputs, public
from kdcli.jobs.plan import (
    ModelChoices, ResolvedModels, TeacherCheck, build_plan, check_teacher, resolve_models, teacher_entries,
)
from kdcli.jobs.resume import check_same_run, identity, open_resume
from kdcli.jobs.runlog import Listeners, RunLog, check_loggers
from kdcli.models.checkpoint import LoadedModel, build, open_source, save_timm_folder
from kdcli.models.init_from_teacher import describe, init_from_teacher
from kdcli.models.preprocessing import recipe_layer, teacher_input
from kdcli.training.cache import OutputCache
from kdcli.training.precision import MixedPrecision
from kdcli.training.cache import resolve as resolve_cache
from kdcli.training.engine import EpochRecord, Listener, StopRequested, Term, TrainingData
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
    teachers: list[dict] | None = None  # with several teachers: each one's ref, arch, weight and top-1
    cache: OutputCache | None = None  # stored outputs of the frozen sources (--cache)

    @property
    def student_folder(self) -> Path:
        return self.out / "student" if self.kind == "distill" else self.out

    def earlier_epochs(self) -> list[tuple[int, EpochRecord]]:
        """(stage index, record) of every epoch the checkpoint resumed from has run."""
        state = self.checkpoint.state
        if state is None:
            return []
        done = [(index, EpochRecord(**r)) for index, o in enumerate(state["done"]) for r in o["history"]]
        return done + [(state["position"]["stage"], EpochRecord(**r)) for r in state["history"]]


class RunListener(Listener, Protocol):
    """What train_student tells: the engine's events, and the phases after training (Protocol)."""

    def phase(self, text: str) -> None: ...


def train_student(recipe: Recipe, student_ref: str, data_spec: str, out: Path, *, listener: RunListener,
                  force: bool = False, resume: bool = False, export: str | None = None, log: list[str] = (),
                  **options) -> dict:
    """distill (with teacher_ref) or train (without): the whole run. Its files are written beside --out and
    moved into place when it succeeds (jobs/outputs.py); a run that stops keeps what --resume needs. A dry run
    writes nothing and returns the run plan. export: formats to export the student to (distill --export);
    log: loggers beside metrics.jsonl/csv (tensorboard). Under torchrun only rank 0 holds the outputs (the others
    only know where they are)."""
    formats = check_request(export, has_data=True, flag="--export")
    if formats and distributed.world_size() > 1:  # the files would exist on rank 0's machine alone
        raise KdcliError("--export is not available under torchrun; export the student afterwards in one "
                         "process: kdcli export OUT/student --format ... --data ...")
    loggers = check_loggers(log)
    if options.get("dry_run"):
        folder = Outputs(Path(out)).folder if resume else Path(out)  # where a resumed run's state is
        return prepare(recipe, student_ref, data_spec, folder, resume=resume, **options).plan
    inputs = {"teacher": options.get("teacher_ref"), "baseline": options.get("baseline_ref"), "student": student_ref,
              **{f"teacher {i}": ref for i, ref in enumerate(options.get("extra_teachers") or (), 1)}}
    outputs = Outputs(Path(out), force=force, resume=resume, data=data_spec, inputs=inputs, in_place=("student",),
                      phase="checking the inputs")
    with outputs if distributed.is_writer() else nullcontext(outputs):
        run = prepare(recipe, student_ref, data_spec, outputs.folder, resume=resume, **options)
        outputs.phase = "training"
        writes = distributed.is_writer()  # under torchrun rank 0 alone writes the metrics, as every output
        with RunLog(run.out, run.earlier_epochs(), loggers) if writes else nullcontext() as run_log:
            # the file first: a printed epoch is on disk
            outcomes = train(run, Listeners(run_log, listener) if writes else listener)
        outputs.phase = "writing and evaluating the student"
        listener.phase(_final_phase(run, formats))
        report = finish(run, outcomes, formats)
    enforce(report)
    return report


def prepare(
    recipe: Recipe,
    student_ref: str,
    data_spec: str,
    out: Path,
    *,
    teacher_ref: str | None = None,
    extra_teachers: list[str] = (),
    teacher_weights: list[float] | None = None,
    init_from: str | None = None,
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
    precision: str = "auto",
    channels_last: bool = False,
) -> Run:
    """Load and check models, data and recipe; check the teacher on the validation split; build the run plan
    (shown through show_plan before training); open the checkpoint to resume from. out: the folder the run
    writes in (its staging folder). workers (an int or "auto") overrides the recipe's data.workers; cache is
    --cache off|auto|DIR."""
    started = time.perf_counter()
    choices = choices or ModelChoices(teacher_arch, student_arch)
    check_gate_options(min_top1, max_drop, teacher_ref is not None)
    cache_folder = resolve_cache(cache, recipe.data.fixed_views())
    device = resolve_device(device_name)
    arithmetic = MixedPrecision(device, precision).name  # an unknown or unavailable choice fails here, early
    tensors, state = distributed.from_writer(lambda: open_resume(out)) if resume else ({}, None)
    source = open_data(data_spec)
    if len(source.train) < 2:
        raise KdcliError(f"the training split of {data_spec} has {len(source.train)} image; training needs at least 2 "
                         "(batch norm cannot train on a batch of one); add images")
    settings = recipe.data
    check_shares(settings.batch_size, len(source.train))
    from_recipe = recipe_layer(settings.image_size, settings.mean, settings.std)
    resolved = resolve_models(student_ref, teacher_ref, source, choices, from_recipe, recipe.seed, extra_teachers)
    teacher, student, config = resolved.teacher, resolved.student, resolved.student_pre.config
    if init_from is not None:
        start_from_teacher(resolved, init_from, teacher_ref, student_ref, choices)
    weights = teacher_weights or [1 / (1 + len(extra_teachers))] * (1 + len(extra_teachers))
    teacher_id = identity(teacher, teacher_ref)
    if extra_teachers:
        ids = [teacher_id, *(identity(t, ref) for (t, _), ref in zip(resolved.more_teachers, extra_teachers))]
        teacher_id = [[one, weight] for one, weight in zip(ids, weights)]
    fingerprint = {
        "kind": kind, "recipe": recipe.to_dict(), "data": source.description, "data_identity": source.identity,
        "teacher": teacher_id, "student": identity(student, student_ref),
        **({"init_from": init_from} if init_from else {}),
    }
    if state is not None:  # before the teacher check: other inputs are the likelier and cheaper mistake
        check_same_run(out, state["fingerprint"], fingerprint)
    baseline = subject(baseline_ref, baseline_arch, "baseline", "--baseline-arch", source) if baseline_ref else None
    view = TrainView(source.train, config, settings.augment.hflip, settings.augment.crop, recipe.seed,
                     settings.fixed_views())
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
    more_teachers, teachers = [], None
    if extra_teachers:
        more_teachers, checks = _check_more_teachers(resolved, source, device, recipe, workers,
                                                      choices.allow_weak_teacher)
        teachers = teacher_entries([teacher_ref, *extra_teachers], [teacher, *(t for t, _ in resolved.more_teachers)],
                                   [check, *checks], weights)
    data = TrainingData(
        view=view, val_loader=eval_loader(EvalView(source.val, config), settings.eval_batch_size, workers),
        batch_size=settings.batch_size, workers=workers, seed=recipe.seed, precision=precision,
        channels_last=channels_last,
    )
    teacher_in = adapter.to(device) if adapter is not None else identity_input
    models = Models(student.model, resolved.started_from_weights, teacher.model if teacher else None,
                    config.image_size, teacher_in, more_teachers, weights if extra_teachers else None)
    all_terms = check_plan(recipe, models)
    plan = build_plan(kind, recipe, source, resolved, student_ref, teacher_ref, check, data.view, device)
    written_by = state.get("world_size", 1) if state is not None else distributed.world_size()
    if written_by != distributed.world_size():
        plan["notes"].append(f"resuming a run written by {written_by} process{'es' if written_by > 1 else ''} on "
                             f"{distributed.world_size()}: the same global batches, in the same order")
    if teachers:
        plan["teachers"] = teachers
    stored = OutputCache(cache_folder, view, device, settings.eval_batch_size) if cache_folder else None
    plan["pipeline"] = pipeline_entry(view, workers, cache_folder)
    plan["estimate"].update(precision=arithmetic, layout="channels-last" if channels_last else "contiguous")
    if show_plan is not None and not dry_run:
        show_plan(plan)
    checkpoint = Checkpoint(out / CHECKPOINT_NAME, fingerprint, tensors=tensors, state=state)
    if checkpoint.resuming:
        with restoring(checkpoint.path):
            restore_models(checkpoint, models, all_terms)
    return Run(kind, recipe, out, device, source, student, config, teacher, teacher_config, baseline, models,
               all_terms, data, checkpoint, min_top1, max_drop, started, check, plan, teachers, stored)


def _check_more_teachers(resolved: ResolvedModels, source: DataSource, device: torch.device, recipe: Recipe,
                         workers: int, allow_weak: bool) -> tuple[list, list[TeacherCheck]]:
    """Each --teacher on the device, probed and checked on the validation split like TEACHER; returns their
    (model, input preparation) pairs for the `teacher` source and their checks."""
    config, settings = resolved.student_pre.config, recipe.data
    members, checks = [], []
    for loaded, pre in resolved.more_teachers:
        loaded.model.to(device).eval().requires_grad_(False)
        probe(loaded, pre.config.image_size, "teacher", device)
        checks.append(check_teacher(loaded, pre, source, device, settings.eval_batch_size, workers,
                                    allow_weak))
        prepare = teacher_input(config, pre.config)
        members.append((loaded.model, prepare.to(device) if prepare is not None else identity_input))
    return members, checks


def start_from_teacher(resolved: ResolvedModels, init_from: str, teacher_ref: str | None, student_ref: str,
                       choices: ModelChoices) -> None:
    """--init-from-teacher: copy what fits of the teacher into the fresh student; the plan and report say what."""
    if resolved.started_from_weights:
        raise KdcliError(f"--init-from-teacher starts a fresh student from the teacher, but the student {student_ref} "
                         "is a checkpoint; pass an architecture name as STUDENT, or drop --init-from-teacher")
    teacher = resolved.teacher if resolved.teacher is not None and init_from == teacher_ref else \
        build(open_source(init_from, choices.teacher_arch, "teacher", "--teacher-arch"))
    student = resolved.student
    summary = init_from_teacher(student.model, teacher.model, student.arch, teacher.arch)
    student.init = describe(summary)
    resolved.started_from_weights = True  # a first-stage anchor may hold the student to these weights
    resolved.init_from_teacher = summary


def check_shares(batch_size: int, train_size: int) -> None:
    """Under several processes data.batch_size is the global batch, split evenly between them."""
    world = distributed.world_size()
    if batch_size % world:
        fit = max(world, batch_size - batch_size % world)
        raise KdcliError(f"data.batch_size {batch_size} is the global batch, shared by {world} processes, so it must "
                         f"be a multiple of {world}; set --set data.batch_size={fit}")
    if world > 1 and train_size < batch_size:
        raise KdcliError(f"the training split has {train_size} images, fewer than one global batch of {batch_size}; "
                         "set a smaller data.batch_size (a multiple of the processes)")


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
    if not run.checkpoint.resuming and distributed.is_writer():
        write_text(run.out / RECIPE_NAME, run.recipe.to_yaml())
    with StopSignals() as signals:
        run.checkpoint.stop_requested = signals.requested
        if run.data.channels_last:
            run.models.set_memory_format(torch.channels_last)
        try:
            outcomes = run_stages(run.recipe, run.all_terms, run.models, run.data, run.device, listener,
                                  run.checkpoint, run.cache)
        except StopRequested as stop:
            where = run.recipe.stages[stop.position.stage].name
            raise Interrupted(
                f"stopped in stage '{where}' at epoch {stop.position.epoch + 1}, step {stop.position.step + 1}; "
                f"training state saved in {run.checkpoint.path}"
            ) from None
        finally:
            run.models.set_memory_format(torch.contiguous_format)  # what is written and exported: timm's layout
    if signals.received is not None:  # arrived after the last step: the state is saved, the outputs are not
        raise SignalReceived(signals.received)
    return outcomes


def _final_phase(run: Run, formats: list[str]) -> str:
    models = ["the student" if run.kind == "distill" else "the model", *(f"its {f} export" for f in formats),
              *(["the teacher"] if run.teacher else []), *(["the baseline"] if run.baseline else [])]
    return (f"evaluating {', '.join(models)} on the {len(run.source.val)} validation images, then timing them "
            f"on {run.device.type}")


def finish(run: Run, outcomes: list[StageOutcome], export_formats: list[str] = ()) -> dict:
    """Write the student (and its exports), assess them, write the report (the training checkpoint goes when the
    outputs are moved into place); the gate applies to the student and every exported file."""
    folder = run.student_folder
    if distributed.is_writer():
        save_timm_folder(folder, run.student, run.config, run.source.classes, {"recipe_hash": run.recipe.digest()})
    exported = write_exports(run.student, run.config, run.source, run.source.classes, export_formats,
                             run.out / "export", run.recipe.seed) if export_formats else []
    teacher = None
    if run.teacher:
        check = run.teacher_check
        teacher = model_subject(run.teacher, run.teacher_config, run.teacher.weights_path,
                                (check.logits, check.labels))
    settings = run.recipe.data
    evaluation = assess(run.source, run.device, settings.eval_batch_size, run.data.workers,
                        model_subject(run.student, run.config, folder / "model.safetensors"), teacher, run.baseline,
                        exported_subjects(exported, run.source.native_size))
    for entry in (evaluation["student"], evaluation["teacher"], evaluation["baseline"], *evaluation["exports"]):
        if entry and entry["path"]:  # where the files will be when the run is moved into place
            entry["path"] = str(public(entry["path"]))
    evaluation["student"]["init"] = run.student.init
    report = stamp({
        "kind": run.kind,
        "run": run_info(run.device, run.source, run.config, time.perf_counter() - run.started, run.recipe.seed),
        "recipe": {"name": run.recipe.name, "hash": run.recipe.digest(), "resolved": run.recipe.to_dict()},
        "stages": [stage_entry(o) for o in outcomes],
        **evaluation,
        **({"teachers": run.teachers} if run.teachers else {}),
        "plan": run.plan,
    })
    report["gate"] = gate_result(report, run.min_top1, run.max_drop)
    return write_report(run.out, report) if distributed.is_writer() else report
