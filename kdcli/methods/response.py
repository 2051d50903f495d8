"""Response-based methods: they read logits only."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kdcli.methods.base import Method, MethodParams, Needs, StepInputs
from kdcli.methods.functional import soft_kl


class CrossEntropyParams(MethodParams):
    method: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class CrossEntropy(Method):
    """Plain supervised loss on the hard labels (no teacher)."""

    name = "ce"
    summary = "cross-entropy on the hard labels (no teacher)"
    Params = CrossEntropyParams

    def forward(self, step: StepInputs) -> torch.Tensor:
        return F.cross_entropy(
            step.student_logits.float(), step.labels, reduction="none", label_smoothing=self.params.label_smoothing
        )


class HintonKDParams(MethodParams):
    method: Literal["kd"] = "kd"
    alpha: float = Field(0.1, ge=0, le=1, description="weight of the hard-label cross-entropy; 1-alpha goes to KL")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T of teacher and student")


class HintonKD(Method):
    """Hinton et al. 2015: alpha·CE(z_s, y) + (1-alpha)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))."""

    name = "kd"
    summary = "Hinton KD: soft teacher targets at temperature T, plus alpha·CE"
    Params = HintonKDParams

    def needs(self) -> Needs:
        return Needs(teacher_logits=True)

    def forward(self, step: StepInputs) -> torch.Tensor:
        p = self.params
        ce = F.cross_entropy(step.student_logits.float(), step.labels, reduction="none")
        return p.alpha * ce + (1 - p.alpha) * soft_kl(step.student_logits, step.teacher_logits, p.temperature)
