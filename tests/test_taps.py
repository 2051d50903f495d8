"""Taps resolve on the families kdcli supports; bad taps and unsuitable methods fail before any training."""

from __future__ import annotations

import pytest
import torch

from conftest import DATA
from kdcli.errors import KdcliError
from kdcli.models import taps
from kdcli.models.checkpoint import fresh_model
from kdcli.models.modes import evaluating
from kdcli.training.engine import loss_terms, step_inputs
from kdcli.training.pipeline import Models, check_plan, stage_plan
from kdcli.training.recipe import load_recipe
from kdcli.training.sources import Batch

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
    # maps [B, C, H, W] on every family: a ViT's (built for 32x32) patch tokens as a 2x2 map, class token dropped
    assert found["feature:-1"] == torch.Size([2, last["num_chs"], 32 // last["reduction"], 32 // last["reduction"]])
    module = f"module:{last['module']}"
    hooked = taps.shapes(net, (module,), 32)[module]
    if arch == "test_vit":  # the block itself gives its tokens: [B, 1 + (32/16)^2, C]
        assert hooked == torch.Size([2, 5, last["num_chs"]])
    else:
        assert hooked == found["feature:-1"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_feature_taps_hold_what_the_modules_output_and_logits_are_the_models(arch):
    """feature:N from timm's forward_intermediates equals the output of feature_info's module (CNNs), and the
    logits of the tapped forward are the model's own."""
    net = model(arch)
    keys = tuple(f"feature:{i}" for i in range(len(net.feature_info)))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), evaluating(net):
        logits, features = taps.forward(net, images, keys)
        assert torch.allclose(logits, net(images), atol=1e-5)
        if arch != "test_vit":
            modules = tuple(f"module:{info['module']}" for info in net.feature_info)
            _, hooked = taps.forward(net, images, modules)
            for key, module in zip(keys, modules):
                assert torch.allclose(features[key], hooked[module], atol=1e-6), (key, module)


def test_a_module_tap_is_the_output_as_the_module_gave_it():
    """layer4.1.bn2 of a resnet: its output is then changed in place (+= shortcut, in-place ReLU); the tap must
    hold the BN output, not what the block made of it."""
    torch.manual_seed(0)
    net = fresh_model("resnet18", 10, 32).model
    bn2 = net.layer4[1].bn2
    with torch.no_grad():  # timm starts the last BN of a block at zero (zero_init_last)
        bn2.weight.normal_()
        bn2.bias.normal_()
    seen = {}
    bn2.register_forward_pre_hook(lambda _m, args: seen.__setitem__("input", args[0].clone()))
    with torch.no_grad(), evaluating(net):
        _, found = taps.forward(net, torch.randn(2, 3, 32, 32), ("module:layer4.1.bn2",))
        expected = bn2(seen["input"])
    assert torch.equal(found["module:layer4.1.bn2"], expected)
    assert (expected < 0).any()  # an in-place ReLU after it would have zeroed these


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
    models = Models(student, True, teacher, 32)
    all_terms = check_plan(recipe, models)
    for index in (1, 2):  # feature and relation stages
        plan = stage_plan(recipe, index, all_terms[index], models)
        batch = Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), torch.arange(4), index, 0)
        terms = loss_terms(plan, step_inputs(plan, plan.needs(), batch))
        total = sum(terms.values())
        assert torch.isfinite(total)
        total.backward()


def test_a_logits_only_stage_hooks_nothing():
    recipe = load_recipe("smskd")
    teacher, student = model("test_resnet"), model("test_efficientnet")
    models = Models(student, False, teacher, 32)
    plan = stage_plan(recipe, 0, check_plan(recipe, models)[0], models)
    assert all(reads.taps == () for reads in plan.needs().values())
    batch = Batch(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)), torch.arange(2), 0, 0)
    loss_terms(plan, step_inputs(plan, plan.needs(), batch))
    for net in (teacher, student):  # hooks live only while a step runs
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_unknown_tap_exits_2_before_training(cli, teacher_dir, tmp_path):
    out = tmp_path / "run"
    result = cli("distill", teacher_dir, "test_efficientnet", "--data", DATA, "--out", out, "--recipe", "smskd",
                 "--set", "stages.1.losses.1.pairs.0.teacher=feature:9")
    assert result.code == 2
    assert "recipe stage 1 ('feature')" in result.err and "unknown teacher tap 'feature:9'" in result.err
    assert "feature:3 (layer3, 192 ch, /16)" in result.err
    assert "Traceback" not in result.err and not out.exists()


def test_attention_transfer_runs_on_a_vit_and_refuses_its_tokens(cli, teacher_dir, tmp_path):
    """A ViT's feature:N taps are maps (its patch tokens), so attention transfer works on them; a module's tokens
    are refused before training."""
    run = cli("distill", teacher_dir, "test_vit", "--data", DATA, "--out", tmp_path / "run", "--recipe", "at",
              "--set", "stages.0.epochs=1", "--json")
    assert run.code == 0, run.err
    assert run.json()["stages"][0]["history"][0]["terms"]["at"] > 0
    out = tmp_path / "tokens"
    result = cli("distill", teacher_dir, "test_vit", "--data", DATA, "--out", out, "--recipe", "at",
                 "--set", "stages.0.losses.1.pairs.0.student=module:blocks.3")
    assert result.code == 2
    assert "the student tap module:blocks.3 gives tokens [5, 64], not a spatial map" in result.err
    assert not out.exists()
