"""The anchor of sequential multi-stage KD (arXiv 2601.15657): hold the student to the stage's frozen reference.

L_anchor = (1/B) Σ_i λ_ref(i) · T_a² · KL(softmax(z_ref(i)/T_a) ‖ softmax(z_s(i)/T_a))
λ_ref(i) = λ (fixed) or (1 − tcp(i)) · λ (tcp), tcp(i) = p_teacher(y_i | x_i) or max_c p_teacher(c | x_i).

z_ref comes from the `reference` source: a frozen copy of the student as it entered the stage. A recipe names it
as a loss (`{method: anchor, ...}`) or with a stage's `anchor:` block, which is shorthand for that loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kdcli.training.methods.base import (
    FLOAT32_MAX, REFERENCE, TEACHER, Method, MethodParams, Needs, Reads, StepInputs,
)
from kdcli.training.methods.functional import soft_kl


class AnchorFields(BaseModel):
    """The anchor's settings shared by the loss and the recipe's `anchor:` shorthand (which also allows none)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    weighting: Literal["none", "fixed", "tcp"] = Field(
        "none", description="none: no reference; fixed: lambda per sample; tcp: (1 - teacher probability) * lambda"
    )
    tcp: Literal["true-class", "max"] = Field(
        "true-class", description="which teacher probability tcp uses: of the true class, or the largest"
    )
    lambda_: float = Field(1.0, ge=0, le=FLOAT32_MAX, alias="lambda", description="λ: strength of the anchor term")
    temperature: float = Field(4.0, gt=0, le=FLOAT32_MAX, description="temperature T_a of the anchor KL")


class AnchorParams(AnchorFields, MethodParams):
    method: Literal["anchor"] = "anchor"
    weighting: Literal["fixed", "tcp"] = Field(
        "tcp", description="fixed: lambda per sample; tcp: (1 - teacher probability) * lambda"
    )


def sample_weights(params: AnchorParams, teacher_logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """λ_ref per sample, shape [B]."""
    if params.weighting == "fixed":
        return torch.full(labels.shape, params.lambda_, dtype=torch.float32, device=labels.device)
    probs = F.softmax(teacher_logits.detach().float(), dim=1)
    if params.tcp == "true-class":
        confidence = probs.gather(1, labels[:, None]).squeeze(1)
    else:
        confidence = probs.max(dim=1).values
    return (1 - confidence) * params.lambda_


class Anchor(Method):
    """SMSKD's reference term: per sample λ_ref(i)·T_a²·KL(softmax(z_ref/T_a) ‖ softmax(z_s/T_a))."""

    name = "anchor"
    summary = ("SMSKD anchor: KL to the stage's frozen reference (the student as it entered the stage), per sample "
               "λ (fixed) or (1 - teacher probability)·λ (tcp); a stage's anchor: block is shorthand for it")
    Params = AnchorParams

    def needs(self) -> Needs:
        needs = {REFERENCE: Reads(logits=True)}
        if self.params.weighting == "tcp":
            needs[TEACHER] = Reads(logits=True)
        return needs

    def forward(self, step: StepInputs) -> torch.Tensor:
        teacher = step.sources.get(TEACHER)
        weights = sample_weights(self.params, teacher.logits if teacher else None, step.labels)
        reference = step.sources[REFERENCE].logits.detach()
        return weights * soft_kl(step.student.logits, reference, self.params.temperature)
