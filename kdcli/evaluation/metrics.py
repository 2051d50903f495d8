"""Accuracy of a model on a loader; the same code serves per-epoch validation and final evaluation."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdcli.models.modes import evaluating


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C] float32 on CPU, labels [N]) in loader order, model in eval mode."""
    logits, labels = [], []
    with evaluating(model):
        for images, targets in loader:
            logits.append(model(images.to(device, non_blocking=True)).float().cpu())
            labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percentage (0–100) of samples whose label is among the k highest logits."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hits.float().mean().item()


ECE_BINS = 15


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels (natural log), computed in float64."""
    log_probs = torch.log_softmax(logits.double(), dim=1)
    return -log_probs.gather(1, labels[:, None].long()).mean().item()


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width bins over the max softmax probability: count, mean confidence and accuracy (0–1) per bin.
    A confidence on a bin edge belongs to the bin below it (bin i holds (i/bins, (i+1)/bins]); 0 goes to bin 0."""
    finite = torch.isfinite(logits).all(dim=1)  # a row with NaN or infinity has no confidence to place
    probs = torch.softmax(logits[finite].double(), dim=1)
    labels = labels[finite]
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    found = []
    for i in range(bins):
        members = index == i
        count = int(members.sum().item())
        found.append({
            "lower": i / bins,
            "upper": (i + 1) / bins,
            "count": count,
            "confidence": confidence[members].mean().item() if count else None,
            "accuracy": correct[members].mean().item() if count else None,
        })
    return found


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE in percentage points: Σ_b (n_b / N) · |accuracy_b − confidence_b|, 15 equal-width bins."""
    total = logits.shape[0]
    gap = sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
              for b in reliability_bins(logits, labels, bins) if b["count"])
    return 100.0 * gap


def non_finite_rows(logits: torch.Tensor) -> int:
    """How many samples have a NaN or infinite logit."""
    return int((~torch.isfinite(logits)).any(dim=1).sum().item())


def agreement(first: torch.Tensor, second: torch.Tensor) -> float | None:
    """Percentage of samples on which two models' top-1 predictions match; None if either has non-finite outputs."""
    if non_finite_rows(first) or non_finite_rows(second):
        return None
    return 100.0 * (first.argmax(dim=1) == second.argmax(dim=1)).double().mean().item()


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """top1, top5, ece (percentages) and nll of logits against labels, and how many samples have non-finite
    logits: with any, the metrics are None (a number would look like a measurement of a broken model)."""
    broken = non_finite_rows(logits)
    if broken:
        return {"top1": None, "top5": None, "nll": None, "ece": None, "non_finite_outputs": broken}
    return {
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "nll": nll(logits, labels),
        "ece": expected_calibration_error(logits, labels),
        "non_finite_outputs": 0,
    }
