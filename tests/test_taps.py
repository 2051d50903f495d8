"""Taps resolve on the families kdcli supports; bad taps and unsuitable methods fail before any training."""

from __future__ import annotations

import pytest
import torch

from conftest import DATA
from kdcli.models import taps
from kdcli.models.checkpoint import fresh_model
from kdcli.training.engine import StagePlan, loss_terms
from kdcli.errors import KdcliError
from kdcli.training.pipeline import Models, check_plan
from kdcli.training.recipe import load_recipe

FAMILIES = ["test_resnet", "mobilenetv2_050", "test_efficientnet", "test_convnext", "test_vit"]


def model(arch: str) -> torch.nn.Module:
    return fresh_model(arch, 10, 32).model


@pytest.mark.parametrize("arch", FAMILIES)
def test_taps_resolve_with_shapes_at_32(arch):
    net = model(arch)
    keys = tuple(t.key for t in taps.available_taps(net))
    assert keys[0] == "feature:0" and keys[-1] == "penultimate"
    found = taps.shapes(net, (*keys, "feature:-1"), 32)
    assert found["feature:-1"] == found[keys[-2]]  # -1 is the last feature_info entry
    width = getattr(net, "head_hidden_size", None) or net.num_features
    assert found["penultimate"] == torch.Size([2, width])
    last = net.feature_info[-1]
    if arch == "test_vit":  # tokens: [B, 1 + (32/16)^2, C]; the ViT was built for 32x32
        assert found["feature:-1"] == torch.Size([2, 5, last["num_chs"]])
    else:
        assert found["feature:-1"] == torch.Size([2, last["num_chs"], 32 // last["reduction"], 32 // last["reduction"]])
    module = last["module"]
    assert taps.shapes(net, (f"module:{module}",), 32)[f"module:{module}"] == found["feature:-1"]


def test_efficientnet_penultimate_is_head_hidden_size_not_num_features_of_the_blocks():
    net = model("test_efficientnet")
    assert taps.shapes(net, ("penultimate",), 32)["penultimate"][1] == net.head_hidden_size


def test_channels_last_maps_become_channels_first():
    nhwc = torch.randn(2, 4, 4, 24)
    assert taps.normalise(nhwc, 24).shape == (2, 24, 4, 4)
    assert taps.normalise(torch.randn(2, 24, 4, 4), 24).shape == (2, 24, 4, 4)
    assert taps.normalise((torch.randn(2, 5, 8), None), None).shape == (2, 5, 8)


def test_unknown_tap_lists_the_available_ones():
    with pytest.raises(KdcliError) as err:
        taps.resolve(model("test_resnet"), "feature:7", "student")
    message = str(err.value)
    assert "unknown student tap 'feature:7'" in message
    assert "feature:2 (layer2, 48 ch, /8)" in message and "penultimate" in message


PAIRS = [("test_resnet", "mobilenetv2_050"), ("test_resnet", "test_efficientnet"), ("test_resnet", "test_resnet"),
         ("test_convnext", "test_resnet"), ("test_efficientnet", "test_resnet"), ("test_vit", "test_resnet"),
         ("test_resnet", "test_vit")]


@pytest.mark.parametrize("teacher_arch,student_arch", PAIRS)
def test_smskd_plans_and_steps_on_mixed_families(teacher_arch, student_arch):
    recipe = load_recipe("smskd")
    teacher = model(teacher_arch).eval().requires_grad_(False)
    student = model(student_arch)
    all_losses = check_plan(recipe, Models(student, False, teacher, 32))
    for stage, losses in zip(recipe.stages[1:], all_losses[1:]):  # feature and relation stages
        plan = StagePlan(index=1, name=stage.name, epochs=1, student=student, teacher=teacher, reference=None,
                         losses=losses, anchor=stage.anchor.model_copy(update={"weighting": "none"}),
                         optimizer=stage.optimizer, schedule=stage.schedule)
        terms = loss_terms(plan, plan.needs(), torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), epoch=0)
        total = sum(terms.values())
        assert torch.isfinite(total)
        total.backward()


def test_a_logits_only_stage_hooks_nothing():
    recipe = load_recipe("smskd")
    teacher, student = model("test_resnet"), model("test_efficientnet")
    (losses, *_) = check_plan(recipe, Models(student, False, teacher, 32))
    stage = recipe.stages[0]
    plan = StagePlan(index=0, name=stage.name, epochs=1, student=student, teacher=teacher, reference=None,
                     losses=losses, anchor=stage.anchor, optimizer=stage.optimizer, schedule=stage.schedule)
    assert plan.needs().teacher_taps == () and plan.needs().student_taps == ()
    loss_terms(plan, plan.needs(), torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)), epoch=0)
    for net in (teacher, student):  # hooks live only while a step runs
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_unknown_tap_exits_2_before_training(cli, teacher_dir, tmp_path):
    out = tmp_path / "run"
    result = cli("distill", teacher_dir, "test_efficientnet", "--data", DATA, "--out", out,
                 "--set", "stages.1.losses.1.pairs.0.teacher=feature:9")
    assert result.code == 2
    assert "recipe stage 1 ('feature')" in result.err and "unknown teacher tap 'feature:9'" in result.err
    assert "feature:3 (layer3, 192 ch, /16)" in result.err
    assert "Traceback" not in result.err and not out.exists()


def test_attention_transfer_on_a_vit_is_rejected_before_training(cli, teacher_dir, tmp_path):
    out = tmp_path / "run"
    result = cli("distill", teacher_dir, "test_vit", "--data", DATA, "--out", out, "--recipe", "at")
    assert result.code == 2
    assert "not a spatial map" in result.err and "attention transfer needs CNN feature maps" in result.err
    assert not out.exists()
