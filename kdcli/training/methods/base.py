"""The one seam between the stage engine and the KD methods.

Each training step the engine fills one StepInputs with everything a loss may need and hands it to every
method of the stage. A method declares up front what it needs (Needs), so the engine computes only that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
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


# ---------------------------------------------------------------- taps in recipes


def normalise_tap(value: object) -> str:
    """A recipe tap -> its key: {feature: N} -> 'feature:N', {module: X} -> 'module:X', 'penultimate' as is.
    The key strings themselves are accepted too, so a recipe written back out (recipe.yaml) loads again."""
    if isinstance(value, dict) and len(value) == 1:
        (kind, arg), = value.items()
        if kind == "feature" and isinstance(arg, int) and not isinstance(arg, bool):
            return f"feature:{arg}"
        if kind == "module" and isinstance(arg, str) and arg.strip():
            return f"module:{arg.strip()}"
    if isinstance(value, str):
        kind, sep, arg = value.partition(":")
        if value == "penultimate":
            return value
        if sep and kind == "feature" and arg.lstrip("-").isdigit():
            return f"feature:{int(arg)}"
        if sep and kind == "module" and arg.strip():
            return f"module:{arg.strip()}"
    raise ValueError(
        f"a tap is {{feature: N}} (timm feature index, -1 = last), {{module: NAME}} (a named_modules() name) "
        f"or penultimate; got {value!r}"
    )


_TAP_SCHEMA = {
    "anyOf": [
        {"const": "penultimate"},
        {"type": "object", "properties": {"feature": {"type": "integer"}}, "required": ["feature"],
         "additionalProperties": False},
        {"type": "object", "properties": {"module": {"type": "string"}}, "required": ["module"],
         "additionalProperties": False},
        {"type": "string", "pattern": r"^(feature:-?\d+|module:.+)$"},
    ],
    "description": "a feature to tap: {feature: N}, {module: NAME} or penultimate (kdcli inspect lists them)",
}

Tap = Annotated[str, BeforeValidator(normalise_tap), WithJsonSchema(_TAP_SCHEMA)]


class TapPair(BaseModel):
    """One student feature matched to one teacher feature."""

    model_config = ConfigDict(extra="forbid")

    student: Tap
    teacher: Tap


def pairs_needs(pairs: list[TapPair], teacher_logits: bool = False) -> Needs:
    return Needs(
        teacher_logits=teacher_logits,
        student_taps=tuple(dict.fromkeys(p.student for p in pairs)),
        teacher_taps=tuple(dict.fromkeys(p.teacher for p in pairs)),
    )
