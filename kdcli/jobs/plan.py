"""The run plan of `distill` and `train`: which models, how each is initialised and fed (and where every value came
from), the data, the steps and a time estimate; and the teacher check that runs before any training.

resolve_models() does the loading and preprocessing part of prepare(); check_teacher() evaluates the teacher on the
validation split (the report reuses the result); build_plan() is what `--dry-run` prints and every run shows first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from kdcli import distributed
from kdcli.data import DataSource, EvalView, eval_loader
from kdcli.data.views import epoch_batches
from kdcli.errors import KdcliError
from kdcli.evaluation.metrics import predict, topk_accuracy
from kdcli.models.checkpoint import LoadedModel, build, check_arch, fresh_model, is_checkpoint_ref, open_source
from kdcli.models.preprocessing import (
    Layer, Resolved, describe_teacher_input, merge, native_layer, own_preprocessing, student_preprocessing,
)

# A teacher is "at chance" unless its validation top-1 is significantly above the best label-blind guess (always
# the most frequent class): one-sided exact binomial test at this level...
CHANCE_ALPHA = 1e-3
# ...and clearly above it: at least this share of the way from that guess to perfect.
CHANCE_MARGIN = 0.05
FLAGS = "--teacher-image-size, --teacher-mean, --teacher-std, --teacher-interpolation"


@dataclass
class ModelChoices:
    """What the user said about the models beyond their names: flags a weights file cannot say for itself."""

    teacher_arch: str | None = None
    student_arch: str | None = None
    teacher_flags: Layer | None = None
    student_flags: Layer | None = None
    reset_head: bool = False
    allow_weak_teacher: bool = False


@dataclass
class ResolvedModels:
    teacher: LoadedModel | None
    teacher_pre: Resolved | None
    student: LoadedModel
    student_pre: Resolved
    started_from_weights: bool
    notes: list[str] = field(default_factory=list)
    more_teachers: list[tuple[LoadedModel, Resolved]] = field(default_factory=list)  # --teacher, in order
    init_from_teacher: dict | None = None  # what --init-from-teacher copied


def _load_teacher(ref: str, arch: str | None, flags: Layer | None, native: Layer, source: DataSource,
                  name: str = "the teacher") -> tuple[LoadedModel, Resolved]:
    teacher = build(open_source(ref, arch, "teacher", "--teacher-arch"))
    if teacher.num_classes != source.num_classes:
        raise KdcliError(
            f"{name} has {teacher.num_classes} classes but the data has {source.num_classes}; "
            "pass the data the teacher was trained on, or a teacher for this data"
        )
    return teacher, own_preprocessing(flags, teacher.stated, native, teacher.arch)


def resolve_models(student_ref: str, teacher_ref: str | None, source: DataSource, choices: ModelChoices,
                   recipe_layer: Layer | None, seed: int, more_teachers: list[str] = ()) -> ResolvedModels:
    """Load the teacher(s) and the student's start, resolve their preprocessings, build the student (seeded).
    Teacher flags apply to TEACHER; each --teacher is fed as its own config says."""
    native = native_layer(source.native_size, f" ({source.sizes})" if source.sizes else "")
    teacher = teacher_pre = None
    if teacher_ref:
        teacher, teacher_pre = _load_teacher(teacher_ref, choices.teacher_arch, choices.teacher_flags, native, source)
    more = [_load_teacher(ref, None, None, native, source, f"the teacher {ref}") for ref in more_teachers]
    start = open_source(student_ref, choices.student_arch, "student", "--student-arch") \
        if is_checkpoint_ref(student_ref) else None
    arch = start.arch if start else student_ref
    check_arch(arch, "--student")
    flags = merge(choices.student_flags, recipe_layer)
    student_pre = student_preprocessing(flags, start.config.preprocessing if start else None,
                                        teacher.stated if teacher else None, native, arch)
    torch.manual_seed(seed)  # a fresh model or a new head is initialised from the recipe's seed
    size = student_pre.config.image_size
    if start is None:
        student = fresh_model(arch, source.num_classes, size)
    else:
        other = start.num_classes != source.num_classes or _labels_differ(start.config.label_names, source.classes)
        if other and not (choices.reset_head or start.named):
            differ = (f"{start.num_classes} classes but the data has {source.num_classes}"
                      if start.num_classes != source.num_classes else
                      f"other classes than the data's ({_label_difference(start.config.label_names, source.classes)})")
            raise KdcliError(f"the student {student_ref} has {differ}; pass --reset-head to keep its backbone with a "
                             "new head for the data's classes, or start from an architecture name")
        student = build(start, source.num_classes, size, new_head=other or choices.reset_head)
    notes = [*(teacher.notes if teacher else []), *(n for t, _ in more for n in t.notes), *student.notes]
    return ResolvedModels(teacher, teacher_pre, student, student_pre, start is not None, notes, more)


def _labels_differ(labels: list[str] | None, classes: list[str]) -> bool:
    return labels is not None and list(labels) != list(classes)


def _label_difference(labels: list[str], classes: list[str]) -> str:
    if sorted(labels) == sorted(classes):
        first = next(i for i, (a, b) in enumerate(zip(labels, classes)) if a != b)
        return f"the same names in another order: class {first} is '{labels[first]}' there, '{classes[first]}' here"
    theirs = [name for name in labels if name not in classes][:3]
    ours = [name for name in classes if name not in labels][:3]
    return f"{len(labels)} names such as {', '.join(theirs) or '-'}; the data has {', '.join(ours) or '-'}"


@dataclass
class TeacherCheck:
    """The teacher's validation accuracy against chance, and its predictions (reused for the report)."""

    top1: float
    chance: float
    threshold: float
    labels_match: bool | None
    weak: bool
    allowed: bool
    logits: torch.Tensor
    labels: torch.Tensor

    def summary(self) -> dict:
        return {"top1": round(self.top1, 2), "chance": round(self.chance, 2), "threshold": round(self.threshold, 2),
                "label_names_match": self.labels_match,
                "result": ("weak, allowed by --allow-weak-teacher" if self.allowed else "weak") if self.weak else "ok"}


def check_teacher(teacher: LoadedModel, pre: Resolved, source: DataSource, device: torch.device, batch_size: int,
                  workers: int, allow_weak: bool) -> TeacherCheck:
    """Evaluate the teacher on the validation split before training; refuse it at chance or with other classes."""
    labels_match = None if teacher.label_names is None else list(teacher.label_names) == list(source.classes)
    if labels_match is False and not allow_weak:
        raise KdcliError(
            f"the teacher's label_names differ from the data's class folders "
            f"({_label_difference(teacher.label_names, source.classes)}): its outputs would be read as the wrong "
            "classes; pass the data it was trained on, rename the folders, or pass --allow-weak-teacher"
        )
    teacher.model.to(device)
    logits, labels = predict(teacher.model, eval_loader(EvalView(source.val, pre.config), batch_size, workers), device)
    n = int(labels.numel())
    broken = int((~logits.isfinite().all(dim=1)).sum())
    if broken:  # a chance-level score would hide the cause
        raise KdcliError(
            f"the teacher's outputs are not finite on {broken} of {n} validation images; "
            "check its weights and preprocessing"
        )
    top1 = topk_accuracy(logits, labels, 1)
    chance = float(torch.bincount(labels, minlength=source.num_classes).max()) / n
    threshold = _significant_count(n, chance) / n
    weak = top1 / 100 < threshold
    if weak and not allow_weak:
        guessed = [f"{k} ({pre.sources[k]})" for k in pre.guessed]
        flags = ", ".join(f"--teacher-{k.replace('_', '-')}" for k in pre.guessed)
        raise KdcliError(  # kept short: a line is capped at 400 characters
            f"the teacher scores {top1:.1f}% top-1, no better than chance ({100 * chance:.1f}%; needs "
            f"{100 * threshold:.1f}% on {n} validation images): "
            + (f"its preprocessing was guessed ({'; '.join(guessed)}): pass {flags} as it was trained; else "
               if guessed else f"check its preprocessing ({FLAGS}), ")
            + "check the class order and --data, or pass --allow-weak-teacher"
        )
    return TeacherCheck(top1, 100 * chance, 100 * threshold, labels_match, weak, weak and allow_weak, logits, labels)


def teacher_entries(refs: list[str], loaded: list[LoadedModel], checks: list[TeacherCheck],
                    weights: list[float]) -> list[dict]:
    """Each of several teachers evaluated on the validation split (its teacher check), with its logit weight;
    last, the weighted ensemble of their logits as the `teacher` source makes it."""
    entries = [{"ref": ref, "arch": t.arch, "weight": round(w, 6), "top1": c.top1}
               for ref, t, c, w in zip(refs, loaded, checks, weights)]
    ensemble = sum(w * c.logits.float() for w, c in zip(weights, checks))
    entries.append({"ref": "ensemble", "arch": "+".join(t.arch for t in loaded), "weight": None,
                    "top1": topk_accuracy(ensemble, checks[0].labels, 1)})
    return entries


def _significant_count(n: int, p0: float) -> int:
    """The fewest correct answers out of n that are both significantly (CHANCE_ALPHA, one-sided exact binomial)
    and clearly (CHANCE_MARGIN) above a label-blind rate p0."""
    floor = math.ceil(n * (p0 + CHANCE_MARGIN * (1 - p0)))
    if p0 <= 0:
        return max(floor, 1)
    if p0 >= 1:
        return n + 1
    log_pmf = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p0)
               + (n - k) * math.log1p(-p0) for k in range(n + 1)]
    tail, count = 0.0, n + 1
    for k in range(n, -1, -1):  # P(X >= k) grows as k falls; stop before it reaches alpha
        tail += math.exp(log_pmf[k])
        if tail >= CHANCE_ALPHA:
            break
        count = k
    return max(floor, count)


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    return len(epoch_batches(train_size, batch_size, 0, 0))


def estimate_seconds(student: torch.nn.Module, teacher: torch.nn.Module | None, size: int, teacher_size: int,
                     view, batch_size: int, steps: int, epochs: int, val_images: int, device: torch.device) -> float:
    """A rough wall-clock estimate: one training batch read from the data, and forward passes of student and
    teacher timed on it (a training step is taken as three student forwards: forward + backward), plus the
    per-epoch validation. Nothing is changed: eval mode, no gradients, no random numbers drawn."""
    started = time.perf_counter()
    view.__getitems__(list(range(min(batch_size, len(view)))))
    read = time.perf_counter() - started
    student_time = _forward_seconds(student, batch_size, size, device)
    teacher_time = _forward_seconds(teacher, batch_size, teacher_size, device) if teacher is not None else 0.0
    step = read + 3 * student_time + teacher_time
    validation = epochs * math.ceil(val_images / batch_size) * student_time
    return steps * step + validation


def _forward_seconds(model: torch.nn.Module, batch: int, size: int, device: torch.device) -> float:
    was_training = model.training
    model.eval()
    x = torch.zeros(batch, 3, size, size, device=device)
    try:
        with torch.no_grad():
            model(x)  # warm-up
            started = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started
    finally:
        model.train(was_training)


def model_entry(loaded: LoadedModel, pre: Resolved, ref: str) -> dict:
    summary = pre.summary()
    if not loaded.pretrained:  # a fresh model's preprocessing is chosen for it, not guessed about it
        summary["guessed"] = []
    return {"ref": ref, "arch": loaded.arch, "classes": loaded.num_classes, "init": loaded.init,
            "params": sum(p.numel() for p in loaded.model.parameters()), "preprocessing": summary}


def build_plan(kind: str, recipe, source: DataSource, models: ResolvedModels, student_ref: str,
               teacher_ref: str | None, check: TeacherCheck | None, view, device: torch.device) -> dict:
    """The resolved plan, as --dry-run --json prints it and report.json keeps it."""
    steps = steps_per_epoch(len(source.train), recipe.data.batch_size)
    processes = distributed.world_size()  # each runs its share of every step
    epochs = sum(stage.epochs for stage in recipe.stages)
    teacher_model = models.teacher.model if models.teacher else None
    teacher_size = models.teacher_pre.config.image_size if models.teacher else 0
    seconds = estimate_seconds(models.student.model, teacher_model, models.student_pre.config.image_size,
                               teacher_size, view, recipe.data.batch_size // processes, steps * epochs, epochs,
                               len(source.val) // processes, device)
    teacher = None
    if models.teacher is not None:
        teacher = {**model_entry(models.teacher, models.teacher_pre, teacher_ref),
                   "input": describe_teacher_input(models.student_pre.config, models.teacher_pre.config),
                   "check": check.summary() if check else None}
    return {
        "kind": kind,
        "recipe": {"name": recipe.name, "stages": [f"{s.name} ({s.epochs} epochs)" for s in recipe.stages]},
        "data": {"description": source.description, "train": len(source.train), "val": len(source.val),
                 "classes": source.num_classes, "image_sizes": source.sizes or None},
        "teacher": teacher,
        "student": {**model_entry(models.student, models.student_pre, student_ref),
                    **({"init_from_teacher": models.init_from_teacher} if models.init_from_teacher else {})},
        "steps": {"per_epoch": steps, "epochs": epochs, "total": steps * epochs, "batch_size": recipe.data.batch_size,
                  "processes": processes},  # batch_size is the global batch, shared by the processes
        "estimate": {"seconds": round(seconds), "device": str(device), "threads": torch.get_num_threads()},
        "notes": models.notes,
    }
