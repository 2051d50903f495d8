"""What a training step may read besides the student: the stage's *sources*, each by name.

    teacher    the teacher, frozen, its input re-normalised from the student's preprocessing to its own
    reference  a frozen copy of the student as it entered the stage (what the anchor holds the student to)

With several teachers, `teacher` is their ensemble: logits averaged with the teacher weights, features from teacher
0 (the TEACHER argument); `teacher.N` is teacher N alone (0 = TEACHER, 1 = the first --teacher, ...), which a
feature or relation method taps with `teacher: N`.

A source turns the step's batch into Outputs (logits, features at tap keys); a method reads them by name and
cannot tell how they were made. The engine knows sources only through this interface. Adding a source = a class
with `outputs` (and `state`/`load_state` if a checkpoint must hold it) + one entry in KINDS. Stored outputs
(cache.py) wrap a FrozenModel and look the batch's views up instead of running it; several teachers are more
entries (`teacher.0`, `teacher.1`, and `teacher`, their weighted average).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from kdcli.errors import KdcliError
from kdcli.models import taps
from kdcli.training.methods import REFERENCE, TEACHER, Outputs, Reads
from kdcli.training.trainstate import load_module, module_tensors


@dataclass
class Batch:
    """One step's training batch. (stage, epoch, samples) names the augmented view of every image."""

    images: torch.Tensor  # prepared for the student
    labels: torch.Tensor
    samples: torch.Tensor  # data-set index of each image
    stage: int
    epoch: int


class Source(Protocol):
    name: str
    hint: str  # what to check when its outputs are not finite

    def outputs(self, batch: Batch, reads: Reads) -> Outputs: ...
    def state(self) -> dict[str, torch.Tensor]: ...  # what a checkpoint must hold to rebuild it
    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None: ...


def identity(images: torch.Tensor) -> torch.Tensor:
    return images


class FrozenModel:
    """A model that is read, never trained: eval mode, no gradient. `prepare` turns the batch as prepared for
    the student into this model's input. A model made for the stage (`saved`) goes into checkpoints."""

    def __init__(self, name: str, model: nn.Module, hint: str, prepare: Callable = identity, saved: bool = False):
        self.name, self.model, self.hint, self.prepare, self.saved = name, model, hint, prepare, saved
        model.eval().requires_grad_(False)

    def outputs(self, batch: Batch, reads: Reads) -> Outputs:
        with torch.no_grad():
            logits, features = taps.forward(self.model, self.prepare(batch.images), reads.taps, self.name)
        return Outputs(logits, features)

    def state(self) -> dict[str, torch.Tensor]:
        return module_tensors("model", self.model) if self.saved else {}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.saved:
            load_module(self.model, "model", tensors)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of a model as it is now, in eval mode, with no gradient."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@dataclass
class Models:
    """The run's models: the student, how it starts, the teacher (if any) and how its input is prepared."""

    student: nn.Module
    student_pretrained: bool
    teacher: nn.Module | None
    image_size: int
    teacher_input: Callable[[torch.Tensor], torch.Tensor] = identity
    more_teachers: list[tuple[nn.Module, Callable]] = field(default_factory=list)  # (model, input) of teacher 1, 2, ..
    teacher_weights: list[float] | None = None  # of every teacher's logits in the ensemble; None: equal

    def teachers(self) -> list[tuple[nn.Module, Callable]]:
        return [(self.teacher, self.teacher_input), *self.more_teachers] if self.teacher is not None else []

    def set_memory_format(self, memory_format: torch.memory_format) -> None:
        """Every model's weights in this layout (--channels-last; saving makes them contiguous again)."""
        for model in (self.student, *(model for model, _ in self.teachers())):
            model.to(memory_format=memory_format)


@dataclass(frozen=True)
class SourceKind:
    network: Callable[[Models], nn.Module | None]  # the model behind it, for checks and tap shapes
    build: Callable[[int, Models], Source]  # called when stage i, which reads it, starts
    unavailable: Callable[[int, Models], str | None]  # why stage i cannot have it (None: it can)


class TeacherEnsemble:
    """Several teachers as one `teacher`: the weighted mean of their logits; features from teacher 0."""

    hint = "check the teachers' weights and preprocessing"

    def __init__(self, members: list[FrozenModel], weights: list[float]):
        self.name, self.members, self.weights = TEACHER, members, weights

    def outputs(self, batch: Batch, reads: Reads) -> Outputs:
        first = self.members[0].outputs(batch, reads)
        logits = None
        if reads.logits:
            others = [m.outputs(batch, Reads(logits=True)).logits for m in self.members[1:]]
            logits = sum(w * z.float() for w, z in zip(self.weights, [first.logits, *others]))
        return Outputs(logits, first.features)

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        return None


def _member(models: Models, index: int) -> FrozenModel:
    model, prepare = models.teachers()[index]
    return FrozenModel(f"{TEACHER}.{index}", model, f"check teacher {index}'s weights and preprocessing", prepare)


def _teacher(index: int, models: Models) -> Source:
    if not models.more_teachers:
        return FrozenModel(TEACHER, models.teacher, "check its weights and preprocessing", models.teacher_input)
    count = len(models.teachers())
    weights = models.teacher_weights or [1 / count] * count
    return TeacherEnsemble([_member(models, i) for i in range(count)], weights)


NO_TEACHER = "this command has no teacher; give one (kdcli distill TEACHER STUDENT) or drop those losses"


def _one_teacher(number: int) -> SourceKind:
    """`teacher.N`: teacher N alone."""
    def unavailable(index: int, models: Models) -> str | None:
        count = len(models.teachers())
        if number < count:
            return None
        return NO_TEACHER if not count else (
            f"there {'is' if count == 1 else 'are'} {count} teacher{'s' * (count != 1)} (0 = TEACHER, then each "
            f"--teacher): give more with --teacher, or tap one of 0..{count - 1}")

    return SourceKind(network=lambda models: models.teachers()[number][0],
                      build=lambda index, models: _member(models, number), unavailable=unavailable)


KINDS: dict[str, SourceKind] = {
    TEACHER: SourceKind(
        network=lambda models: models.teacher,
        build=_teacher,
        unavailable=lambda index, models: None if models.teacher is not None else NO_TEACHER,
    ),
    REFERENCE: SourceKind(
        network=lambda models: models.student,
        build=lambda index, models: FrozenModel(
            REFERENCE, frozen_copy(models.student),
            "it is the student as the previous stage left it: lower that stage's learning rate" if index else
            "it is the student's starting weights: check them and the preprocessing", saved=True),
        unavailable=lambda index, models: None if index > 0 or models.student_pretrained else (
            "the reference of the first stage is the student's starting weights, and this student is randomly "
            "initialised; set anchor.weighting: none or pass a student checkpoint"),
    ),
}


def _kind(name: str) -> SourceKind:
    prefix, _, number = name.partition(".")
    if prefix == TEACHER and number.isdigit():
        return _one_teacher(int(number))
    if name not in KINDS:
        raise KdcliError(f"no source '{name}'; the sources are {', '.join(KINDS)}")
    return KINDS[name]


def check(index: int, readers: Mapping[str, list[str]], models: Models) -> None:
    """Refuse a stage whose losses read a source it cannot have; readers: {source name: term names}."""
    for name, terms in readers.items():
        reason = _kind(name).unavailable(index, models)
        if reason:
            raise KdcliError(f"{', '.join(terms)} read{'s' if len(terms) == 1 else ''} the {name}, but {reason}")


def network(name: str, models: Models) -> nn.Module:
    return _kind(name).network(models)


def build(index: int, names, models: Models) -> dict[str, Source]:
    """The sources stage `index` reads, made as it starts (the reference is copied from the student now)."""
    return {name: _kind(name).build(index, models) for name in names}


def parse_teacher_weights(text: str, teachers: int) -> list[float]:
    """--teacher-weights 0.5,0.5 -> one non-negative weight per teacher, normalised to sum 1."""
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != teachers or any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise KdcliError(f"--teacher-weights {text}: expected {teachers} non-negative numbers, one per teacher "
                         f"(TEACHER first, then each --teacher), not all zero, e.g. {','.join(['0.5'] * teachers)}")
    return [w / sum(weights) for w in weights]
