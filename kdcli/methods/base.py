"""The one seam between the stage engine and the KD methods.

Each training step the engine fills one StepInputs with everything a loss may need and hands it to every
method of the stage. A method declares up front what it needs (Needs), so the engine computes only that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class MethodParams(BaseModel):
    """Recipe entry of one loss: `method` picks the class, `weight` scales its loss in the stage sum."""

    model_config = ConfigDict(extra="forbid")

    method: str
    weight: float = Field(1.0, ge=0, description="multiplies this loss in the stage's sum")


@dataclass(frozen=True)
class Needs:
    """What a method reads from a step; the engine runs the teacher and hooks only for what is needed."""

    teacher_logits: bool = False
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()


@dataclass
class StepInputs:
    """Everything a loss may read in one step. Teacher, student and reference saw the same augmented batch."""

    student_logits: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch: int = 0  # 0-based epoch within the stage, for methods with a warm-up


class Method(nn.Module):
    """One KD loss. Subclasses set name, summary and Params, and implement forward.

    forward returns a per-sample loss [B] or a scalar; the engine takes its mean and multiplies by the weight.
    Parameters a method owns (connectors) train with the student and are never exported with it.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[MethodParams]]

    def __init__(self, params: MethodParams):
        super().__init__()
        self.params = params

    def needs(self) -> Needs:
        return Needs()

    def setup(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        """Called once with the shapes of the tapped features, before the optimizer is built."""

    def forward(self, step: StepInputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
