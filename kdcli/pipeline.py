"""Runs a recipe's stages in order, hands the reference from stage to stage, collects the results.

Everything that can be checked is checked before the first step: methods against the teacher, taps against
both models, the first-stage anchor against the student's initialisation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from kdcli import taps
from kdcli.anchor import frozen_copy
from kdcli.engine import EpochRecord, Listener, StagePlan, TrainingData, run_stage
from kdcli.errors import KdcliError
from kdcli.methods import REGISTRY, Method
from kdcli.recipe import Recipe, Stage


@dataclass
class StageOutcome:
    name: str
    epochs: int
    anchor: str
    seconds: float
    history: list[EpochRecord]

    @property
    def val_top1(self) -> float:
        return self.history[-1].val_top1


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
        student_shapes = _feature_shapes(models.student, student_keys, "student", models.image_size)
        teacher_shapes = _feature_shapes(models.teacher, teacher_keys, "teacher", models.image_size)
    except KdcliError as err:
        raise KdcliError(f"{where}: {err}") from None
    for _, _, method in losses:
        method.setup(student_shapes, teacher_shapes)


@torch.no_grad()
def _feature_shapes(model: nn.Module | None, keys: tuple[str, ...], side: str, size: int) -> dict[str, torch.Size]:
    if not keys:
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with taps.capture(model, keys, side) as found:
        model(torch.zeros(2, 3, size, size, device=device))
    model.train(was_training)
    return {key: found[key].shape for key in keys}


def run_stages(
    recipe: Recipe,
    all_losses: list[list[tuple[str, float, Method]]],
    models: Models,
    data: TrainingData,
    device: torch.device,
    listener: Listener,
    teacher_input=lambda x: x,
) -> list[StageOutcome]:
    """Train the student through every stage (losses from check_plan); each anchored stage is held to the
    student as it entered it."""
    outcomes = []
    for index, (stage, losses) in enumerate(zip(recipe.stages, all_losses)):
        for _, _, method in losses:
            method.to(device)
        reference = frozen_copy(models.student) if stage.anchor.weighting != "none" else None
        plan = StagePlan(
            index=index, name=stage.name, epochs=stage.epochs, student=models.student, teacher=models.teacher,
            reference=reference, losses=losses, anchor=stage.anchor, optimizer=stage.optimizer,
            schedule=stage.schedule, teacher_input=teacher_input,
        )
        result = run_stage(plan, data, device, listener)
        outcomes.append(StageOutcome(stage.name, stage.epochs, stage.anchor.weighting, result.seconds, result.history))
    return outcomes
