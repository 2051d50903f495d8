"""Metrics on hand-made logits whose answers are known, and MACs of a tiny model counted by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdcli.evaluation.cost import count_macs, measure_speed
from kdcli.evaluation.metrics import (
    accuracy_metrics, agreement, expected_calibration_error, nll, reliability_bins, topk_accuracy,
)
from kdcli.evaluation.gate import check_gate_options, gate_result
from kdcli.errors import KdcliError


def two_class(confidences: list[float], correct: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax puts probability p on class 0; the label is 0 when correct, else 1."""
    p = torch.tensor(confidences, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=1).float()
    labels = torch.tensor([0 if c else 1 for c in correct])
    return logits, labels


def test_topk():
    logits = torch.tensor([[3.0, 2, 1, 0], [0, 1, 2, 3], [1, 3, 2, 0]])
    labels = torch.tensor([0, 0, 2])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(100 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(200 / 3)
    assert topk_accuracy(logits, labels, 5) == 100.0  # k beyond the classes: every label is in the top k


def test_nll():
    assert nll(torch.zeros(5, 4), torch.tensor([0, 1, 2, 3, 0])) == pytest.approx(math.log(4), abs=1e-12)
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])  # p(label) = 0.75, then 0.25
    assert nll(logits, torch.tensor([0, 0])) == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2, abs=1e-7)


def test_ece_known_answer():
    # four at confidence 0.9 with 3 right (gap 0.15), two at 0.7 both wrong (gap 0.7):
    # ECE = 4/6 * 0.15 + 2/6 * 0.7 = 1/3
    logits, labels = two_class([0.9] * 4 + [0.7] * 2, [True, True, True, False, False, False])
    assert expected_calibration_error(logits, labels) == pytest.approx(100 / 3, abs=1e-4)
    bins = reliability_bins(logits, labels)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 6
    assert [b["count"] for b in bins if b["count"]] == [2, 4]
    assert bins[13]["accuracy"] == 0.75 and bins[13]["confidence"] == pytest.approx(0.9, abs=1e-6)
    assert bins[10]["accuracy"] == 0.0  # 0.7 lies in (10/15, 11/15]


def test_ece_of_a_calibrated_model_is_zero():
    logits, labels = two_class([0.8] * 5, [True, True, True, True, False])
    assert expected_calibration_error(logits, labels) == pytest.approx(0.0, abs=1e-4)


def test_agreement_and_all_metrics():
    first = torch.tensor([[2.0, 1, 0], [0, 2, 1], [1, 0, 2], [2, 0, 1]])
    second = torch.tensor([[5.0, 1, 0], [0, 0, 1], [1, 0, 2], [0, 3, 1]])
    assert agreement(first, second) == 50.0
    metrics = accuracy_metrics(first, torch.tensor([0, 1, 2, 0]))
    assert set(metrics) == {"top1", "top5", "nll", "ece", "non_finite_outputs"}
    assert metrics["non_finite_outputs"] == 0 and metrics["top1"] == 100.0 and metrics["top5"] == 100.0


def test_macs_of_a_tiny_model_match_a_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    conv = (8 * 8 * 8) * (3 * 3 * 3)  # one MAC per output element per kernel weight
    linear = 8 * 8 * 8 * 10
    assert count_macs(model, 8) == conv + linear
    assert model.training  # the mode is restored


def test_speed_records_latency_throughput_and_threads():
    speed = measure_speed(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)), 4, torch.device("cpu"))
    assert 0 < speed["latency"]["median_ms"] <= speed["latency"]["p90_ms"]
    assert speed["throughput"]["images_per_s"] > 0 and speed["threads"] == torch.get_num_threads()


def test_gate_messages_name_the_bound_and_both_numbers():
    report = {"student": {"top1": 83.2}, "teacher": {"top1": 90.0}}
    gate = gate_result(report, 85.0, 5.0)
    assert not gate["passed"]
    assert gate["failures"] == ["student top-1 83.20 < --min-top1 85.00",
                                "teacher top-1 90.00 - student top-1 83.20 = 6.80 points > --max-drop 5.00"]
    assert gate_result(report, 83.2, 6.8)["passed"]
    with pytest.raises(KdcliError, match="--max-drop needs a teacher"):
        check_gate_options(None, 1.0, has_teacher=False)
    with pytest.raises(KdcliError, match="between 0 and 100"):
        check_gate_options(0.85 * 1000, None, has_teacher=False)
