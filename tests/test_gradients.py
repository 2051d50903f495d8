"""The gradient reaches the student and never the teacher or the frozen reference."""

from __future__ import annotations

import timm
import torch

from kdcli.training.anchor import frozen_copy
from kdcli.training.engine import StagePlan, loss_terms
from kdcli.training.recipe import load_recipe
from kdcli.training.pipeline import build_losses


def test_gradients_reach_only_the_student():
    torch.manual_seed(0)
    recipe = load_recipe("kd-anchored")
    stage = recipe.stages[1]  # kd + tcp anchor
    student = timm.create_model("test_efficientnet", num_classes=10)
    teacher = timm.create_model("test_resnet", num_classes=10).eval().requires_grad_(False)
    reference = frozen_copy(student)
    plan = StagePlan(
        index=1, name=stage.name, epochs=1, student=student, teacher=teacher, reference=reference,
        losses=build_losses(stage), anchor=stage.anchor, optimizer=stage.optimizer, schedule=stage.schedule,
    )
    # nudge the student so the anchor term is not zero at this step
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    terms = loss_terms(plan, plan.needs(), images, labels, epoch=0)
    assert set(terms) == {"kd", "anchor"} and terms["anchor"].item() > 0
    sum(terms.values()).backward()

    student_grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in student_grads)
    assert sum(g.abs().sum().item() for g in student_grads) > 0
    for frozen in (teacher, reference):
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert not reference.training


def test_anchor_gradient_flows_through_the_student_only():
    torch.manual_seed(1)
    student = timm.create_model("test_efficientnet", num_classes=10)
    reference = frozen_copy(student)
    from kdcli.training.anchor import anchor_loss

    images = torch.randn(4, 3, 32, 32)
    logits_s = student(images) * 1.5
    loss = anchor_loss(logits_s, reference(images), torch.ones(4), 4.0)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in reference.parameters())
