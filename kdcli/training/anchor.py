"""The anchor of sequential multi-stage KD (arXiv 2601.15657): a frozen reference and its per-sample weight.

L_anchor = (1/B) Σ_i λ_ref(i) · T_a² · KL(softmax(z_ref(i)/T_a) ‖ softmax(z_s(i)/T_a))
λ_ref(i) = λ (fixed) or (1 − tcp(i)) · λ (tcp), tcp(i) = p_teacher(y_i | x_i) or max_c p_teacher(c | x_i).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.training.methods.functional import soft_kl


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference: a copy of the student as it is now, in eval mode, with no gradient."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def sample_weights(
    weighting: str, tcp_mode: str, lam: float, teacher_logits: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """λ_ref per sample, shape [B]."""
    if weighting == "fixed":
        return torch.full(labels.shape, lam, dtype=torch.float32, device=labels.device)
    if weighting != "tcp":
        raise ValueError(f"no per-sample weights for anchor weighting {weighting!r}")
    probs = F.softmax(teacher_logits.detach().float(), dim=1)
    if tcp_mode == "true-class":
        confidence = probs.gather(1, labels[:, None]).squeeze(1)
    else:
        confidence = probs.max(dim=1).values
    return (1 - confidence) * lam


def anchor_loss(
    student_logits: torch.Tensor, reference_logits: torch.Tensor, weights: torch.Tensor, temperature: float
) -> torch.Tensor:
    return (weights * soft_kl(student_logits, reference_logits.detach(), temperature)).mean()
