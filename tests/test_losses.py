"""kd and the anchor term against independent implementations of the published formulas, on fixed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from kdcli.training.methods import REGISTRY, Outputs, StepInputs
from kdcli.training.recipe import Recipe, validate_recipe


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


def step(student, labels, **sources) -> StepInputs:
    """A step where the student gave `student` logits and each named source gave the logits passed for it."""
    return StepInputs(Outputs(student), labels, {name: Outputs(logits) for name, logits in sources.items()})


@pytest.mark.parametrize("alpha,temperature", [(0.1, 4.0), (0.5, 1.0), (0.0, 2.5), (1.0, 4.0)])
def test_kd_matches_hinton_formula(alpha, temperature):
    student, teacher, labels = fixed_batch()
    kl = reference_kl(teacher, student, temperature)
    ce = [-math.log(softmax_rows(student[i : i + 1], 1.0)[0][y]) for i, y in enumerate(labels.tolist())]
    expected = sum(alpha * c + (1 - alpha) * temperature**2 * k for c, k in zip(ce, kl)) / len(kl)
    got = make("kd", alpha=alpha, temperature=temperature)(step(student, labels, teacher=teacher))
    assert got.shape == (len(labels),)
    assert got.mean().item() == pytest.approx(expected, abs=1e-6)


def test_ce_matches_negative_log_likelihood():
    student, _, labels = fixed_batch(1)
    expected = sum(-math.log(softmax_rows(student[i : i + 1], 1.0)[0][y]) for i, y in enumerate(labels.tolist()))
    got = make("ce")(step(student, labels)).mean().item()
    assert got == pytest.approx(expected / len(labels), abs=1e-6)


@pytest.mark.parametrize("weighting,tcp", [("tcp", "true-class"), ("tcp", "max"), ("fixed", "true-class")])
def test_anchor_matches_the_smskd_formula(weighting, tcp):
    """(1/B) Σ_i λ_ref(i)·T_a²·KL(softmax(z_ref/T_a) ‖ softmax(z_s/T_a)), λ_ref = λ or (1 − p_teacher)·λ."""
    # teacher probabilities chosen by hand; logits = log(p) so softmax gives them back exactly
    probs = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25], [0.9, 0.05, 0.05]]
    labels = torch.tensor([0, 0, 1, 2])
    g = torch.Generator().manual_seed(2)
    student = torch.randn(4, 3, generator=g, dtype=torch.float64) * 2
    reference = torch.randn(4, 3, generator=g, dtype=torch.float64) * 2
    lam, temperature = 2.0, 3.0
    if weighting == "fixed":
        weights = [lam] * 4
    else:
        confidence = [row[y] for row, y in zip(probs, labels.tolist())] if tcp == "true-class" else map(max, probs)
        weights = [(1 - c) * lam for c in confidence]
    kl = reference_kl(reference, student, temperature)
    expected = sum(w * temperature**2 * k for w, k in zip(weights, kl)) / len(kl)
    anchor = make("anchor", weighting=weighting, tcp=tcp, temperature=temperature, **{"lambda": lam})
    got = anchor(step(student, labels, reference=reference, teacher=torch.tensor(probs).log()))
    assert got.shape == (4,)
    assert got.mean().item() == pytest.approx(expected, abs=1e-6)


def test_the_anchor_block_is_shorthand_for_the_anchor_loss():
    block = {"name": "a", "epochs": 1, "losses": [{"method": "kd"}],
             "anchor": {"weighting": "fixed", "lambda": 0.5, "temperature": 2}}
    loss = {"name": "a", "epochs": 1,
            "losses": [{"method": "kd"}, {"method": "anchor", "weighting": "fixed", "lambda": 0.5, "temperature": 2}]}
    short, long = (validate_recipe({"stages": [stage]}, "test").stages[0] for stage in (block, loss))
    assert short.loss_specs() == long.loss_specs()
    assert short.anchor_weighting() == long.anchor_weighting() == "fixed"
    with pytest.raises(Exception, match="the anchor is given twice"):
        validate_recipe({"stages": [{**loss, "anchor": {"weighting": "tcp"}}]}, "test")


def test_every_registered_method_has_a_schema_in_the_recipe():
    schema_defs = Recipe.model_json_schema()["$defs"]
    for cls in REGISTRY.values():
        assert cls.Params.__name__ in schema_defs, cls.name
