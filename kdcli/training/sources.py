"""What a training step may read besides the student: the stage's *sources*, each by name.

    teacher    the teacher, frozen, its input re-normalised from the student's preprocessing to its own
    reference  a frozen copy of the student as it entered the stage (what the anchor holds the student to)

A source turns the step's batch into Outputs (logits, features at tap keys); a method reads them by name and
cannot tell how they were made. The engine knows sources only through this interface. Adding a source = a class
with `outputs` (and `state`/`load_state` if a checkpoint must hold it) + one entry in KINDS. Stored outputs
(cache.py) wrap a FrozenModel and look the batch's views up instead of running it; several teachers would be
more entries (`teacher.0`, `teacher.1`, an averaged `teacher`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SourceKind:
    network: Callable[[Models], nn.Module | None]  # the model behind it, for checks and tap shapes
    build: Callable[[int, Models], Source]  # called when stage i, which reads it, starts
    unavailable: Callable[[int, Models], str | None]  # why stage i cannot have it (None: it can)


KINDS: dict[str, SourceKind] = {
    TEACHER: SourceKind(
        network=lambda models: models.teacher,
        build=lambda index, models: FrozenModel(TEACHER, models.teacher, "check its weights and preprocessing",
                                                models.teacher_input),
        unavailable=lambda index, models: None if models.teacher is not None else (
            "this command has no teacher; give one (kdcli distill TEACHER STUDENT) or drop those losses"),
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
