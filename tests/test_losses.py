"""kd and the anchor term against independent implementations of the published formulas, on fixed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from kdcli.training.anchor import anchor_loss, sample_weights
from kdcli.training.methods import REGISTRY, StepInputs
from kdcli.training.recipe import Recipe


def fixed_batch(seed: int = 0, batch: int = 6, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(batch, classes, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, classes, (batch,), generator=g)
    return student, teacher, labels


def softmax_rows(z: torch.Tensor, t: float) -> list[list[float]]:
    rows = []
    for row in z.tolist():
        exps = [math.exp(v / t) for v in row]
        total = sum(exps)
        rows.append([e / total for e in exps])
    return rows


def reference_kl(target: torch.Tensor, student: torch.Tensor, t: float) -> list[float]:
    """Per sample Σ_c p_target,c · (log p_target,c − log p_student,c), in plain Python floats."""
    pt, ps = softmax_rows(target, t), softmax_rows(student, t)
    return [sum(a * (math.log(a) - math.log(b)) for a, b in zip(rt, rs)) for rt, rs in zip(pt, ps)]


def make(method: str, **params):
    cls = REGISTRY[method]
    return cls(cls.Params(method=method, **params))


@pytest.mark.parametrize("alpha,temperature", [(0.1, 4.0), (0.5, 1.0), (0.0, 2.5), (1.0, 4.0)])
def test_kd_matches_hinton_formula(alpha, temperature):
    student, teacher, labels = fixed_batch()
    kl = reference_kl(teacher, student, temperature)
    ce = [-math.log(softmax_rows(student[i : i + 1], 1.0)[0][y]) for i, y in enumerate(labels.tolist())]
    expected = sum(alpha * c + (1 - alpha) * temperature**2 * k for c, k in zip(ce, kl)) / len(kl)
    got = make("kd", alpha=alpha, temperature=temperature)(
        StepInputs(student_logits=student, labels=labels, teacher_logits=teacher)
    )
    assert got.shape == (len(labels),)
    assert got.mean().item() == pytest.approx(expected, abs=1e-6)


def test_ce_matches_negative_log_likelihood():
    student, _, labels = fixed_batch(1)
    expected = sum(-math.log(softmax_rows(student[i : i + 1], 1.0)[0][y]) for i, y in enumerate(labels.tolist()))
    got = make("ce")(StepInputs(student_logits=student, labels=labels)).mean().item()
    assert got == pytest.approx(expected / len(labels), abs=1e-6)


def test_tcp_weights_on_a_hand_made_batch():
    # teacher probabilities chosen by hand; logits = log(p) so softmax gives them back exactly
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25], [0.9, 0.05, 0.05]])
    labels = torch.tensor([0, 0, 1, 2])
    logits = probs.log()
    lam = 2.0
    true_class = sample_weights("tcp", "true-class", lam, logits, labels)
    assert true_class.tolist() == pytest.approx([(1 - 0.7) * lam, (1 - 0.1) * lam, (1 - 0.5) * lam, (1 - 0.05) * lam])
    top = sample_weights("tcp", "max", lam, logits, labels)
    assert top.tolist() == pytest.approx([(1 - 0.7) * lam, (1 - 0.6) * lam, (1 - 0.5) * lam, (1 - 0.9) * lam])
    fixed = sample_weights("fixed", "true-class", lam, None, labels)
    assert fixed.tolist() == [lam] * 4


def test_anchor_term_matches_formula():
    student, reference, labels = fixed_batch(2)
    weights = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.25, 1.5], dtype=torch.float64)
    temperature = 3.0
    kl = reference_kl(reference, student, temperature)
    expected = sum(w * temperature**2 * k for w, k in zip(weights.tolist(), kl)) / len(kl)
    got = anchor_loss(student, reference, weights, temperature).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_every_registered_method_has_a_schema_in_the_recipe():
    schema_defs = Recipe.model_json_schema()["$defs"]
    for cls in REGISTRY.values():
        assert cls.Params.__name__ in schema_defs, cls.name
