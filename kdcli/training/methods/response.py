"""Response-based methods: they read logits only."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from kdcli.training.methods.base import TEACHER, Method, MethodParams, Needs, Reads, StepInputs
from kdcli.training.methods.functional import as_float, soft_kl


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
            as_float(step.student.logits), step.labels, reduction="none", label_smoothing=self.params.label_smoothing
        )


def _teacher_logits() -> Needs:
    return {TEACHER: Reads(logits=True)}


class HintonKDParams(MethodParams):
    method: Literal["kd"] = "kd"
    alpha: float = Field(0.1, ge=0, le=1, description="weight of the hard-label cross-entropy; 1-alpha goes to KL")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T of teacher and student")


class _SoftTargets(Method):
    """ce_weight·CE(z_s, y) + kd_weight·T²·KL(softmax(soft(z_t)/T) ‖ softmax(soft(z_s)/T)), per sample."""

    def needs(self) -> Needs:
        return _teacher_logits()

    def weights(self) -> tuple[float, float]:  # pragma: no cover - abstract
        """(weight of the cross-entropy, weight of the KL term)."""
        raise NotImplementedError

    def soft(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the KL term compares (a variant standardises them)."""
        return logits

    def forward(self, step: StepInputs) -> torch.Tensor:
        ce_weight, kd_weight = self.weights()
        z_s, z_t = as_float(step.student.logits), as_float(step.sources[TEACHER].logits)
        ce = F.cross_entropy(z_s, step.labels, reduction="none")
        return ce_weight * ce + kd_weight * soft_kl(self.soft(z_s), self.soft(z_t), self.params.temperature)


class HintonKD(_SoftTargets):
    """Hinton et al. 2015: alpha·CE(z_s, y) + (1-alpha)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))."""

    name = "kd"
    summary = "Hinton KD: soft teacher targets at temperature T, plus alpha·CE"
    Params = HintonKDParams

    def weights(self) -> tuple[float, float]:
        return self.params.alpha, 1 - self.params.alpha


class DKDParams(MethodParams):
    method: Literal["dkd"] = "dkd"
    alpha: float = Field(1.0, ge=0, description="weight of the target-class term (TCKD)")
    beta: float = Field(8.0, ge=0, description="weight of the non-target-class term (NCKD)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")
    warmup: int = Field(20, ge=0, description="epochs over which the loss ramps up linearly (0: none)")


class DKD(Method):
    """Zhao et al. 2022, decoupled KD: (alpha·TCKD + beta·NCKD) · min((epoch + 1) / warmup, 1).

    TCKD = T²·KL([p_t,gt, 1 − p_t,gt] ‖ [p_s,gt, 1 − p_s,gt]); NCKD = T²·KL over the non-target classes
    (softmax of z/T with the true class masked out). Warm-up: as the reference (mdistiller), whose epochs count
    from 1; kdcli's stage epochs count from 0, so the factor in the first epoch of a stage is 1/warmup and the
    loss is at full weight from epoch `warmup` (1-based) on. No cross-entropy inside: list `ce` beside it.
    """

    name = "dkd"
    summary = "decoupled KD: target-class and non-target-class KL terms, with a warm-up"
    Params = DKDParams

    def needs(self) -> Needs:
        return _teacher_logits()

    def forward(self, step: StepInputs) -> torch.Tensor:
        p, t = self.params, self.params.temperature
        z_s, z_t = as_float(step.student.logits) / t, as_float(step.sources[TEACHER].logits) / t
        gt = F.one_hot(step.labels, z_s.shape[1]).bool()
        p_s, p_t = F.softmax(z_s, dim=1), F.softmax(z_t, dim=1)
        b_s = torch.stack([p_s[gt], (p_s * ~gt).sum(1)], dim=1).clamp_min(1e-12)
        b_t = torch.stack([p_t[gt], (p_t * ~gt).sum(1)], dim=1).clamp_min(1e-12)
        tckd = (b_t * (b_t.log() - b_s.log())).sum(1) * t**2
        nckd = soft_kl(z_s.masked_fill(gt, -1e9), z_t.masked_fill(gt, -1e9), 1.0) * t**2
        ramp = min((step.epoch + 1) / p.warmup, 1.0) if p.warmup else 1.0
        return ramp * (p.alpha * tckd + p.beta * nckd)


class StandardisedKDParams(MethodParams):
    method: Literal["kd_std"] = "kd_std"
    ce_weight: float = Field(0.1, ge=0, description="weight of the hard-label cross-entropy")
    kd_weight: float = Field(9.0, ge=0, description="weight of the T²·KL term on standardised logits")
    temperature: float = Field(2.0, gt=0, description="base temperature T, applied to the standardised logits")

    @model_validator(mode="before")
    @classmethod
    def _legacy_alpha(cls, raw: Any) -> Any:
        """Recipes written by earlier kdcli versions give `alpha`, meaning alpha·CE + (1 − alpha)·T²·KL: kept as meant."""
        if not isinstance(raw, dict) or "alpha" not in raw:
            return raw
        if "ce_weight" in raw or "kd_weight" in raw:
            raise ValueError("give either alpha (older recipes) or ce_weight and kd_weight, not both")
        raw = dict(raw)
        alpha = raw.pop("alpha")
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 <= alpha <= 1:
            raw.update(ce_weight=alpha, kd_weight=1 - alpha)
            return raw
        raise ValueError(f"alpha must be a number from 0 to 1 (got {alpha!r}); or give ce_weight and kd_weight")


def standardise(logits: torch.Tensor) -> torch.Tensor:
    """(z − mean(z)) / (1e-7 + std(z)) per sample, std unbiased (torch's default)."""
    return (logits - logits.mean(1, keepdim=True)) / (1e-7 + logits.std(1, keepdim=True))


class StandardisedKD(_SoftTargets):
    """Sun et al. 2024, logit-standardised KD: KD on per-sample standardised logits of both models,
    ce_weight·CE(z_s, y) + kd_weight·T²·KL(softmax(ẑ_t/T) ‖ softmax(ẑ_s/T)). The defaults are the paper's
    CIFAR setting (CE weight 0.1, KD weight 9, base temperature 2)."""

    name = "kd_std"
    summary = "KD on logits standardised per sample ((z - mean) / std): ce_weight·CE + kd_weight·T²·KL"
    Params = StandardisedKDParams

    def weights(self) -> tuple[float, float]:
        return self.params.ce_weight, self.params.kd_weight

    def soft(self, logits: torch.Tensor) -> torch.Tensor:
        return standardise(logits)
