"""The commands' work, without any printing: distill, train, eval. The CLI parses, calls these, prints."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from timm.models import get_pretrained_cfg

from kdcli.assess import Subject, assess, run_info
from kdcli.checkpoint import LoadedModel, fresh_model, is_checkpoint_ref, load_checkpoint, save_timm_folder
from kdcli.data import DataConfig, DataSource, EvalView, Renormalize, TrainView, eval_loader, open_data
from kdcli.engine import Listener, StopRequested, TrainingData
from kdcli.errors import Interrupted, KdcliError
from kdcli.fsio import write_text
from kdcli.gate import check_gate_options, enforce, gate_result
from kdcli.pipeline import Checkpoint, Models, check_plan, restore_models, run_stages
from kdcli.recipe import DataSettings, Recipe
from kdcli.report import stage_entry, stamp, write_report
from kdcli.trainstate import CHECKPOINT_NAME, StopSignals, file_digest, first_difference, read_checkpoint


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KdcliError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise KdcliError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def check_out(out: Path, force: bool) -> None:
    """Refuse an output folder that is a file, non-empty (unless forced) or not writable; create nothing."""
    if out.exists() and not out.is_dir():
        raise KdcliError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        hint = "--resume to continue its run, " if (out / CHECKPOINT_NAME).is_file() else ""
        raise KdcliError(f"--out {out} is not empty; pass {hint}--force to overwrite it, or choose a new folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    try:  # permission bits do not tell (root, read-only mounts): try it
        os.rmdir(tempfile.mkdtemp(prefix=".kdcli-", dir=existing))
    except OSError as err:
        raise KdcliError(f"--out {out}: cannot write in {existing} ({err.strerror}); choose another folder") from err


def arch_default_config(arch: str, native_size: int | None) -> DataConfig:
    """timm's default preprocessing of an architecture; at a data set's native size, no resize or crop."""
    cfg = get_pretrained_cfg(arch)
    return DataConfig(
        image_size=native_size or int(cfg.input_size[-1]),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation=cfg.interpolation or "bilinear",
        crop_pct=1.0 if native_size else float(cfg.crop_pct or 0.875),
        crop_mode=cfg.crop_mode or "center",
    )


def student_data_config(
    settings: DataSettings, teacher: LoadedModel | None, student: LoadedModel | None, student_arch: str, native: int | None
) -> DataConfig:
    """Size from the recipe, else the teacher's config; normalisation from the recipe, else the starting
    student's own, else the teacher's; whatever is still open from the architecture's timm defaults."""
    size_source = next((m.data_config for m in (teacher, student) if m and m.data_config), None)
    norm_source = next((m.data_config for m in (student, teacher) if m and m.data_config), None)
    base = size_source or arch_default_config(student_arch, native)
    config = DataConfig(
        image_size=settings.image_size or base.image_size,
        mean=settings.mean or (norm_source or base).mean,
        std=settings.std or (norm_source or base).std,
        interpolation=base.interpolation,
        crop_pct=base.crop_pct,
        crop_mode=base.crop_mode,
    )
    return config


def _subject(ref: str, arch: str | None, role: str, flag: str, source: DataSource) -> Subject:
    """A model to evaluate with its own preprocessing (its config.json, else its architecture's defaults)."""
    loaded = load_checkpoint(ref, arch, role, flag)
    if loaded.num_classes != source.num_classes:
        raise KdcliError(
            f"the {role} has {loaded.num_classes} classes but the data has {source.num_classes}; "
            "evaluate it on the data it was trained for"
        )
    config = loaded.data_config or arch_default_config(loaded.arch, source.native_size)
    return Subject(loaded, config, loaded.weights_path)


def _probe(loaded: LoadedModel, size: int, role: str, device: torch.device) -> None:
    """One forward pass at the input size, so a size the architecture cannot take fails before training."""
    was_training = loaded.model.training
    try:
        with torch.no_grad():
            loaded.model.eval()(torch.zeros(2, 3, size, size, device=device))
    except (RuntimeError, ValueError, AssertionError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KdcliError(
            f"the {role} {loaded.arch} cannot take {size}x{size} images ({reason}); set a larger data.image_size"
        ) from err
    finally:
        loaded.model.train(was_training)


def _identity(loaded: LoadedModel | None, ref: str | None) -> str | None:
    """What must not change between a run and its resumption: weights contents, or the architecture."""
    if loaded is None:
        return None
    return f"sha256:{file_digest(loaded.weights_path)[:16]}" if loaded.weights_path else f"arch:{ref}"


def _check_same_run(out: Path, saved: dict, now: dict) -> None:
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


def _open_resume(out: Path) -> tuple[dict, dict]:
    path = Path(out) / CHECKPOINT_NAME
    if not path.is_file():
        reason = "it holds a finished run" if (Path(out) / "report.json").is_file() else "there is no checkpoint"
        raise KdcliError(f"nothing to resume in {out}: {reason}; drop --resume to start a run")
    return read_checkpoint(path)


def train_student(recipe: Recipe, student_ref: str, data_spec: str, out: Path, **options) -> dict:
    """distill or train (see _train_student); a run that fails before its first checkpoint leaves no folder."""
    out = Path(out)
    fresh = not out.exists()
    try:
        return _train_student(recipe, student_ref, data_spec, out, **options)
    except KdcliError:
        if fresh and out.is_dir() and not (out / CHECKPOINT_NAME).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train_student(
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
    listener: Listener,
    kind: str = "distill",
    baseline_ref: str | None = None,
    baseline_arch: str | None = None,
    min_top1: float | None = None,
    max_drop: float | None = None,
) -> dict:
    """distill (with a teacher) or train (without): run the recipe, checkpointing every epoch, then write the
    student, assess it (against the teacher and a baseline, if given), write the report and apply the gate
    (QualityGateFailed after everything is written). With resume, continue the interrupted run in out."""
    started = time.perf_counter()
    out = Path(out)
    check_gate_options(min_top1, max_drop, teacher_ref is not None)
    device = resolve_device(device_name)
    tensors, state = _open_resume(out) if resume else ({}, None)
    if not resume:
        check_out(out, force)
    teacher = load_checkpoint(teacher_ref, teacher_arch, "teacher", "--teacher-arch") if teacher_ref else None
    source = open_data(data_spec)
    if teacher and teacher.num_classes != source.num_classes:
        raise KdcliError(
            f"the teacher has {teacher.num_classes} classes but the data has {source.num_classes}; "
            "pass the data the teacher was trained on, or a teacher for this data"
        )
    baseline = _subject(baseline_ref, baseline_arch, "baseline", "--baseline-arch", source) if baseline_ref else None
    start = load_checkpoint(student_ref, student_arch, "student", "--student-arch") if is_checkpoint_ref(student_ref) else None
    num_classes = teacher.num_classes if teacher else source.num_classes
    if start and start.num_classes != num_classes:
        whose = "the teacher" if teacher else "the data"
        raise KdcliError(
            f"the student has {start.num_classes} classes but {whose} has {num_classes}; "
            "start from a student with the same classes, or from an architecture name"
        )
    arch = start.arch if start else student_ref
    config = student_data_config(recipe.data, teacher, start, arch, source.native_size)
    torch.manual_seed(recipe.seed)
    student = start or fresh_model(arch, num_classes, config.image_size)
    student.model.to(device)
    _probe(student, config.image_size, "student", device)
    adapter = None
    if teacher:
        teacher.model.to(device).eval().requires_grad_(False)
        _probe(teacher, config.image_size, "teacher", device)
        teacher_config = teacher.data_config or arch_default_config(teacher.arch, source.native_size)
        if (teacher_config.mean, teacher_config.std) != (config.mean, config.std):
            adapter = Renormalize(config, teacher_config).to(device)

    settings = recipe.data
    data = TrainingData(
        view=TrainView(source.train, config, settings.augment.hflip, settings.augment.crop, recipe.seed),
        val_loader=eval_loader(EvalView(source.val, config), settings.eval_batch_size, settings.workers),
        batch_size=settings.batch_size, workers=settings.workers, seed=recipe.seed,
    )
    models = Models(student.model, student.pretrained, teacher.model if teacher else None, config.image_size)
    all_losses = check_plan(recipe, models)
    fingerprint = {
        "kind": kind, "recipe": recipe.to_dict(), "data": source.description,
        "teacher": _identity(teacher, teacher_ref), "student": _identity(student, student_ref),
    }
    checkpoint = Checkpoint(out / CHECKPOINT_NAME, fingerprint, tensors=tensors, state=state)
    if checkpoint.resuming:
        _check_same_run(out, state["fingerprint"], fingerprint)
        restore_models(checkpoint, models, all_losses)
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "recipe.yaml", recipe.to_yaml())
    with StopSignals() as signals:
        checkpoint.stop_requested = signals.requested
        try:
            outcomes = run_stages(recipe, all_losses, models, data, device, listener, checkpoint,
                                  teacher_input=adapter or (lambda x: x))
        except StopRequested as stop:
            where = recipe.stages[stop.position.stage].name
            raise Interrupted(
                f"stopped in stage '{where}' at epoch {stop.position.epoch + 1}, step {stop.position.step + 1}; "
                f"training state saved in {checkpoint.path}"
            ) from None
    folder = out / "student" if kind == "distill" else out
    save_timm_folder(folder, student, config, source.classes, {"recipe_hash": recipe.digest()})
    teacher_subject = Subject(teacher, teacher_config, teacher.weights_path) if teacher else None  # its own config
    evaluation = assess(source, device, settings.eval_batch_size, settings.workers,
                        Subject(student, config, folder / "model.safetensors"), teacher_subject, baseline)
    evaluation["student"]["init"] = str(start.weights_path) if start else "random"
    report = stamp({
        "kind": kind,
        "run": run_info(device, source, config, time.perf_counter() - started, recipe.seed),
        "recipe": {"name": recipe.name, "hash": recipe.digest(), "resolved": recipe.to_dict()},
        "stages": [stage_entry(o) for o in outcomes],
        **evaluation,
    })
    report["gate"] = gate_result(report, min_top1, max_drop)
    report = write_report(out, report)
    checkpoint.path.unlink()  # the run is complete: its outputs replace the training state
    enforce(report)
    return report


def eval_checkpoint(
    ref: str,
    data_spec: str,
    arch: str | None = None,
    *,
    batch_size: int = 256,
    workers: int = 0,
    device_name: str = "auto",
    teacher_ref: str | None = None,
    teacher_arch: str | None = None,
    baseline_ref: str | None = None,
    baseline_arch: str | None = None,
    out: Path | None = None,
    force: bool = False,
    min_top1: float | None = None,
    max_drop: float | None = None,
    threads: int | None = None,
) -> dict:
    """Assess a checkpoint (against a teacher and a baseline, if given); with out, write the report there.
    Applies the gate last: QualityGateFailed carries the finished report."""
    check_gate_options(min_top1, max_drop, teacher_ref is not None)
    if threads is not None and threads < 1:
        raise KdcliError(f"--threads {threads}: must be 1 or more")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return _eval(ref, data_spec, arch, batch_size, workers, device_name, teacher_ref, teacher_arch, baseline_ref,
                     baseline_arch, out, force, min_top1, max_drop)
    finally:
        torch.set_num_threads(previous)


def _eval(ref: str, data_spec: str, arch: str | None, batch_size: int, workers: int, device_name: str,
          teacher_ref: str | None, teacher_arch: str | None, baseline_ref: str | None, baseline_arch: str | None,
          out: Path | None, force: bool, min_top1: float | None, max_drop: float | None) -> dict:
    started = time.perf_counter()
    device = resolve_device(device_name)
    if out is not None:
        check_out(Path(out), force)
    source = open_data(data_spec)
    student = _subject(ref, arch, "checkpoint", "--arch", source)
    teacher = _subject(teacher_ref, teacher_arch, "teacher", "--teacher-arch", source) if teacher_ref else None
    baseline = _subject(baseline_ref, baseline_arch, "baseline", "--baseline-arch", source) if baseline_ref else None
    evaluation = assess(source, device, batch_size, workers, student, teacher, baseline)
    report = stamp({
        "kind": "eval",
        "run": run_info(device, source, student.config, time.perf_counter() - started),
        "recipe": None,
        "stages": [],
        **evaluation,
    })
    report["gate"] = gate_result(report, min_top1, max_drop)
    if out is not None:
        report = write_report(Path(out), report)
    else:
        report["plots"] = {"training": None, "reliability": None}
    enforce(report)
    return report
