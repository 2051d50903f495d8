"""Loss arithmetic shared by several methods and by the anchor term."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kl(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample T² · KL(softmax(target/T) ‖ softmax(student/T)), shape [B]."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_target = F.log_softmax(target_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_target, reduction="none", log_target=True).sum(dim=1)
    return kl * temperature**2
