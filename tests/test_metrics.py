"""Metrics on hand-made logits whose answers are known, and MACs of a tiny model counted by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdcli.evaluation.cost import Schedule, count_macs, measure_interleaved, measure_speeds, speedup, summarize
from kdcli.evaluation.predictors import TorchPredictor
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


class FakeClock:
    """A clock that moves only when a fake model 'runs': timings without wall-clock assertions."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def model(self, name: str, durations):
        """A pass whose k-th run takes durations(k) seconds of fake time."""
        count = iter(range(10**9))

        def run():
            self.calls.append(name)
            self.now += durations(next(count))

        return run


SCHEDULE = Schedule(batch=1, warmup=2, runs_per_round=10, min_rounds=3, max_rounds=12, max_seconds=1e9)


def test_speeds_are_measured_interleaved_until_the_median_settles():
    clock = FakeClock()
    passes = {"student": clock.model("s", lambda k: 0.001), "teacher": clock.model("t", lambda k: 0.003)}
    measured = measure_interleaved(passes, SCHEDULE, clock)
    assert clock.calls[:4] == ["s", "s", "t", "t"]  # warm-up, then student, teacher, student, ...
    assert clock.calls[4:10] == ["s", "t"] * 3
    student, teacher = (summarize(measured[name], SCHEDULE) for name in ("student", "teacher"))
    assert student["rounds"] == 3 and student["runs"] == 30  # settled at once: stops at the minimum
    assert student["reliable"] and student["median_ms"] == pytest.approx(1.0) and teacher["median_ms"] == pytest.approx(3.0)
    assert speedup(teacher, student) == pytest.approx(3.0)


def test_a_wide_spread_is_not_reliable_and_no_speedup_is_claimed():
    clock = FakeClock()
    bursts = lambda k: 0.010 if k % 4 == 0 else 0.001  # noqa: E731  one run in four hit by load elsewhere
    measured = measure_interleaved({"student": clock.model("s", bursts),
                                    "teacher": clock.model("t", lambda k: 0.003)}, SCHEDULE, clock)
    student, teacher = (summarize(measured[name], SCHEDULE) for name in ("student", "teacher"))
    assert not student["reliable"] and "p90 is 10.0x the median" in student["note"]
    assert teacher["reliable"] and speedup(teacher, student) is None


def test_a_median_that_never_settles_stops_at_the_bound_and_is_not_reliable():
    clock = FakeClock()
    drifting = clock.model("s", lambda k: 0.001 * 1.01 ** k)  # the machine slows down run after run
    measured = measure_interleaved({"student": drifting}, SCHEDULE, clock)["student"]
    assert measured["rounds"] == SCHEDULE.max_rounds and not measured["stable"]
    result = summarize(measured, SCHEDULE)
    assert not result["reliable"] and "did not settle within 12 rounds" in result["note"]


def test_the_time_bound_ends_the_measurement():
    clock = FakeClock()
    bounded = Schedule(batch=1, warmup=0, runs_per_round=10, min_rounds=3, max_rounds=100, max_seconds=1.0)
    measured = measure_interleaved({"student": clock.model("s", lambda k: 0.05 * 1.01 ** k)}, bounded, clock)
    assert measured["student"]["rounds"] == 2  # two rounds take just over 1 s of fake time: no third is started
    slow = measure_interleaved({"student": clock.model("s", lambda k: 0.5)}, bounded, clock)["student"]
    assert slow["rounds"] == 1 and not slow["stable"]  # out of time before the minimum: not settled
    assert "did not settle within 1 round" in summarize(slow, bounded)["note"]


def test_speeds_of_real_models_record_latency_throughput_and_runtime():
    predictor = TorchPredictor(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)))
    speeds = measure_speeds({"tiny": lambda batch: predictor.forward_pass(batch, 4)})
    latency, throughput = speeds["tiny"]["latency"], speeds["tiny"]["throughput"]
    assert 0 < latency["p10_ms"] <= latency["median_ms"] <= latency["p90_ms"] and latency["runs"] >= 30
    assert throughput["batch"] == 32 and throughput["images_per_s"] > 0 and isinstance(throughput["reliable"], bool)


def test_the_headline_claims_a_speedup_only_when_it_was_measured_reliably():
    from kdcli.evaluation.report import headline

    report = {"student": {"top1": 80.0, "arch": "s"}, "teacher": {"top1": 90.0}, "baseline": None,
              "comparison": {"retention": 88.9, "param_ratio": 5.0, "speedup": None}}
    assert "faster" not in headline(report) and "speed at batch 1 not measurable reliably here" in headline(report)
    report["comparison"]["speedup"] = 2.5
    assert "**2.5×** faster at batch 1" in headline(report) and "not measurable" not in headline(report)


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
