"""The one seam between the stage engine and the KD methods.

Each training step the engine fills one StepInputs with everything a loss may need: the student's logits and
tapped features, the labels, and the outputs of the stage's *sources* (frozen models, or later stored outputs)
by name, and hands it to every method of the stage. A method declares up front what it reads from which model
(Needs), so the engine runs only those forwards and taps only those features.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from torch import nn

STUDENT = "student"  # the model being trained; every other name in Needs is a source of the stage
TEACHER = "teacher"  # the teacher, fed as it was trained
REFERENCE = "reference"  # the frozen student as it entered the stage (anchored stages)


FLOAT32_MAX = 3.4028234663852886e38  # settings become float32 tensors: a larger value cannot be used


class MethodParams(BaseModel):
    """Recipe entry of one loss: `method` picks the class, `weight` scales its loss in the stage sum."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: str
    weight: float = Field(1.0, ge=0, le=FLOAT32_MAX, description="multiplies this loss in the stage's sum")


@dataclass(frozen=True)
class Reads:
    """What is read from one model in a step: its logits, and its features at these tap keys."""

    logits: bool = False
    taps: tuple[str, ...] = ()

    def __or__(self, other: Reads) -> Reads:
        return Reads(self.logits or other.logits, tuple(dict.fromkeys((*self.taps, *other.taps))))


Needs = Mapping[str, Reads]  # model name ('student' or a source name) -> what is read from it


def merge_needs(needs: Iterable[Needs]) -> dict[str, Reads]:
    """The union of several methods' needs, per model."""
    merged: dict[str, Reads] = {}
    for one in needs:
        for name, reads in one.items():
            merged[name] = merged.get(name, Reads()) | reads
    return merged


@dataclass
class Outputs:
    """What one model produced on the step's batch: its logits, and its features by tap key."""

    logits: torch.Tensor | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def finite(self) -> bool:
        values = [self.logits, *self.features.values()]
        return all(bool(torch.isfinite(v).all()) for v in values if v is not None)


@dataclass
class StepInputs:
    """Everything a loss may read in one step. The student and every source saw the same augmented batch."""

    student: Outputs
    labels: torch.Tensor
    sources: dict[str, Outputs] = field(default_factory=dict)
    epoch: int = 0  # 0-based epoch within the stage, for methods with a warm-up


class Method(nn.Module):
    """One KD loss. Subclasses set name, summary and Params, and implement needs and forward.

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
        """What the method reads beyond the student's logits and the labels, by model name."""
        return {}

    def setup(self, shapes: Mapping[str, Mapping[str, torch.Size]]) -> None:
        """Called once with the shapes of the tapped features ({model name: {tap key: shape}}), before the
        optimizer is built."""

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


def pairs_needs(pairs: list[TapPair]) -> Needs:
    """The student's and the teacher's features at tap pairs."""
    return {
        STUDENT: Reads(taps=tuple(dict.fromkeys(p.student for p in pairs))),
        TEACHER: Reads(taps=tuple(dict.fromkeys(p.teacher for p in pairs))),
    }
