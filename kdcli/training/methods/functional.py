"""Loss arithmetic shared by several methods and by the anchor term."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Half precision (autocast) up to float32 for loss arithmetic; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def soft_kl(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample T² · KL(softmax(target/T) ‖ softmax(student/T)), shape [B]."""
    log_p_student = F.log_softmax(as_float(student_logits) / temperature, dim=1)
    log_p_target = F.log_softmax(as_float(target_logits) / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_target, reduction="none", log_target=True).sum(dim=1)
    return kl * temperature**2
