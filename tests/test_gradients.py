"""The gradient reaches the student and never the teacher or the frozen reference."""

from __future__ import annotations

import timm
import torch

from kdcli.training.engine import loss_terms, step_inputs
from kdcli.training.pipeline import Models, check_plan, stage_plan
from kdcli.training.recipe import load_recipe
from kdcli.training.sources import Batch


def anchored_plan(seed: int):
    """Stage 1 of kd-anchored (kd + tcp anchor) on a test_efficientnet student, nudged away from its reference."""
    torch.manual_seed(seed)
    recipe = load_recipe("kd-anchored")
    student = timm.create_model("test_efficientnet", num_classes=10)
    teacher = timm.create_model("test_resnet", num_classes=10)
    models = Models(student, True, teacher, 32)
    plan = stage_plan(recipe, 1, check_plan(recipe, models)[1], models)
    with torch.no_grad():  # so that the anchor term is not zero at this step
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = Batch(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.arange(8), 1, 0)
    return plan, teacher, plan.sources["reference"].model, loss_terms(plan, step_inputs(plan, plan.needs(), batch))


def test_gradients_reach_only_the_student():
    plan, teacher, reference, terms = anchored_plan(0)
    assert set(terms) == {"kd", "anchor"} and terms["anchor"].item() > 0
    sum(terms.values()).backward()
    student_grads = [p.grad for p in plan.student.parameters()]
    assert all(g is not None for g in student_grads)
    assert sum(g.abs().sum().item() for g in student_grads) > 0
    for frozen in (teacher, reference):
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert not reference.training and not teacher.training


def test_anchor_gradient_flows_through_the_student_only():
    plan, teacher, reference, terms = anchored_plan(1)
    terms["anchor"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in plan.student.parameters())
    for frozen in (teacher, reference):
        assert all(p.grad is None for p in frozen.parameters())
