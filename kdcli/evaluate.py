"""Accuracy of a model on a loader; the same code serves per-epoch validation and final evaluation."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C] float32 on CPU, labels [N]) in loader order, model in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for images, targets in loader:
        logits.append(model(images.to(device, non_blocking=True)).float().cpu())
        labels.append(targets)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percentage (0–100) of samples whose label is among the k highest logits."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hits.float().mean().item()
