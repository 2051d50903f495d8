"""Runs a recipe's stages in order, hands the reference from stage to stage, collects the results.

Everything that can be checked is checked before the first step: methods against the teacher, taps against
both models, the first-stage anchor against the student's initialisation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdcli.models import taps
from kdcli.training.anchor import frozen_copy
from kdcli.training.engine import EpochRecord, EpochSums, Listener, Position, StagePlan, StageRunner, TrainingData
from kdcli.errors import KdcliError
from kdcli.training.methods import REGISTRY, Method
from kdcli.training.recipe import Recipe, Stage
from kdcli.training.trainstate import (
    join_tensors, load_module, module_tensors, restore_rng, restoring, rng_tensors, split_tensors, write_checkpoint,
)

Losses = list[tuple[str, float, Method]]


@dataclass
class StageOutcome:
    name: str
    epochs: int
    anchor: str
    history: list[EpochRecord]

    @property
    def val_top1(self) -> float:
        return self.history[-1].val_top1

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.history)


@dataclass
class Models:
    student: nn.Module
    student_pretrained: bool
    teacher: nn.Module | None
    image_size: int


def build_losses(stage: Stage) -> list[tuple[str, float, Method]]:
    """(term name, weight, method) per loss; a method listed twice gets a numbered term name."""
    counts = Counter(spec.method for spec in stage.losses)
    seen: Counter = Counter()
    losses = []
    for spec in stage.losses:
        seen[spec.method] += 1
        name = spec.method if counts[spec.method] == 1 else f"{spec.method}#{seen[spec.method]}"
        losses.append((name, spec.weight, REGISTRY[spec.method](spec)))
    return losses


def check_plan(recipe: Recipe, models: Models) -> list[list[tuple[str, float, Method]]]:
    """Validate every stage against the models and set methods up; returns the losses of each stage."""
    all_losses = []
    for index, stage in enumerate(recipe.stages):
        where = f"recipe stage {index} ('{stage.name}')"
        if index == 0 and stage.anchor.weighting != "none" and not models.student_pretrained:
            raise KdcliError(
                f"{where}: an anchor on the first stage needs a student that starts from weights, but the student "
                "is randomly initialised; set anchor.weighting: none or pass a student checkpoint"
            )
        losses = build_losses(stage)
        if models.teacher is None:
            needy = [name for name, _, m in losses if m.needs().teacher_logits or m.needs().teacher_taps]
            if needy or stage.anchor.weighting == "tcp":
                what = f"losses {', '.join(needy)}" if needy else "anchor weighting tcp"
                raise KdcliError(f"{where}: {what} need a teacher, and this command has none")
        _setup_methods(losses, models, where)
        all_losses.append(losses)
    return all_losses


def _setup_methods(losses: list[tuple[str, float, Method]], models: Models, where: str) -> None:
    """Resolve the taps on both models (unknown taps fail here) and give methods their feature shapes."""
    student_keys = tuple(dict.fromkeys(k for _, _, m in losses for k in m.needs().student_taps))
    teacher_keys = tuple(dict.fromkeys(k for _, _, m in losses for k in m.needs().teacher_taps))
    if not student_keys and not teacher_keys:
        return
    try:
        student_shapes = taps.shapes(models.student, student_keys, models.image_size, "student")
        teacher_shapes = taps.shapes(models.teacher, teacher_keys, models.image_size, "teacher")
        for _, _, method in losses:
            method.setup(student_shapes, teacher_shapes)
    except KdcliError as err:
        raise KdcliError(f"{where}: {err}") from None


@dataclass
class Checkpoint:
    """Where to save training state, what identifies the run, and what a saved state restores."""

    path: Path
    fingerprint: dict
    stop_requested: object = lambda: False  # () -> bool
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # of the checkpoint resumed from
    state: dict | None = None

    @property
    def resuming(self) -> bool:
        return self.state is not None


class _Saver:
    """The stage loop's Control: writes the whole run's state at a position."""

    def __init__(self, checkpoint: Checkpoint, models: Models, all_losses: list[Losses], done: list[StageOutcome],
                 history: list[EpochRecord], reference: nn.Module | None):
        self.checkpoint, self.models, self.all_losses = checkpoint, models, all_losses
        self.done, self.history, self.reference = done, history, reference

    def stop_requested(self) -> bool:
        return self.checkpoint.stop_requested()

    def save(self, runner: StageRunner, position: Position, sums: EpochSums | None) -> None:
        tensors = {**module_tensors("student", self.models.student), **rng_tensors()}
        if self.reference is not None:
            tensors.update(module_tensors("reference", self.reference))
        for index, losses in enumerate(self.all_losses):
            for term, _, method in losses:
                tensors.update(module_tensors(f"method.{index}.{term}", method))
        state = {
            "fingerprint": self.checkpoint.fingerprint,
            "position": asdict(position),
            "done": [{"name": o.name, "epochs": o.epochs, "anchor": o.anchor,
                      "history": [asdict(r) for r in o.history]} for o in self.done],
            "history": [asdict(r) for r in self.history],
            "sums": asdict(sums) if sums else None,
            "runner": split_tensors(runner.state(), "runner", tensors),
        }
        write_checkpoint(self.checkpoint.path, tensors, state)


def restore_models(checkpoint: Checkpoint, models: Models, all_losses: list[Losses]) -> None:
    """Put the student, every method's parameters and the RNG back as they were saved."""
    load_module(models.student, "student", checkpoint.tensors)
    for index, losses in enumerate(all_losses):
        for term, _, method in losses:
            load_module(method, f"method.{index}.{term}", checkpoint.tensors)
    restore_rng(checkpoint.tensors)


def run_stages(
    recipe: Recipe,
    all_losses: list[Losses],
    models: Models,
    data: TrainingData,
    device: torch.device,
    listener: Listener,
    checkpoint: Checkpoint,
    teacher_input=lambda x: x,
) -> list[StageOutcome]:
    """Train the student through every stage (losses from check_plan), saving a checkpoint after every epoch;
    each anchored stage is held to the student as it entered it. Resumes where a checkpoint left off."""
    state = checkpoint.state
    start = Position(**state["position"]) if state else Position(0)
    done = [StageOutcome(o["name"], o["epochs"], o["anchor"], [EpochRecord(**r) for r in o["history"]])
            for o in state["done"]] if state else []
    for index in range(start.stage, len(recipe.stages)):
        stage, losses = recipe.stages[index], all_losses[index]
        resumed = state is not None and index == start.stage
        history = [EpochRecord(**r) for r in state["history"]] if resumed else []
        if not resumed or start.epoch < stage.epochs:
            for _, _, method in losses:
                method.to(device)
            reference = frozen_copy(models.student) if stage.anchor.weighting != "none" else None
            if resumed and reference is not None:
                with restoring(checkpoint.path):
                    load_module(reference, "reference", checkpoint.tensors)
            plan = StagePlan(
                index=index, name=stage.name, epochs=stage.epochs, student=models.student, teacher=models.teacher,
                reference=reference, losses=losses, anchor=stage.anchor, optimizer=stage.optimizer,
                schedule=stage.schedule, teacher_input=teacher_input,
            )
            runner = StageRunner(plan, data, device, listener)
            sums = None
            if resumed:
                with restoring(checkpoint.path):
                    runner.load_state(join_tensors(state["runner"], checkpoint.tensors))
                sums = EpochSums(**state["sums"]) if state["sums"] else None
            saver = _Saver(checkpoint, models, all_losses, done, history, reference)
            runner.run(start if resumed else Position(index), sums, history, saver)
        done.append(StageOutcome(stage.name, stage.epochs, stage.anchor.weighting, history))
    return done
