"""`kdcli convert`: pickle checkpoints become timm folders through torch.load(weights_only=True) only."""

from __future__ import annotations

import collections

import pytest
import timm
import torch

from test_errors import assert_one_clear_line


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=7).eval()


def _wrapped(kind: str, state: dict) -> object:
    other = _model(99).state_dict()
    return {
        "plain": state,
        "state_dict": {"epoch": 3, "arch": "test_resnet", "state_dict": state, "optimizer": {"lr": 0.1}},
        "model": {"model": state, "epoch": 3},
        "ddp": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "ema": {"state_dict": other, "state_dict_ema": state},
    }[kind]


@pytest.mark.parametrize("kind", ["plain", "state_dict", "model", "ddp", "ema"])
def test_convert_wrappers_to_a_folder_timm_loads(cli, tmp_path, kind):
    model = _model(0)
    src = tmp_path / "ckpt.pth"
    torch.save(_wrapped(kind, model.state_dict()), src)
    out = tmp_path / "converted"
    extra = ["--ema"] if kind == "ema" else []
    result = cli("convert", src, "--arch", "test_resnet", "--out", out, "--image-size", "32", *extra)
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert reloaded.pretrained_cfg["input_size"] == (3, 32, 32) or list(reloaded.pretrained_cfg["input_size"]) == [3, 32, 32]


def test_converted_folder_is_a_teacher_kdcli_reads(cli, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    src = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), src)
    out = tmp_path / "teacher"
    assert cli("convert", src, "--arch", "test_resnet", "--out", out, "--image-size", "32").code == 0
    result = cli("eval", out, "--data", "synthetic:train=16,val=32", "--json")
    assert result.code == 0, result.err
    assert result.json()["student"]["arch"] == "test_resnet"


class _NotATensor:
    pass


def test_code_in_the_pickle_is_refused_and_nothing_written(cli, tmp_path):
    src = tmp_path / "evil.pth"
    torch.save({"state_dict": _model(0).state_dict(), "extra": _NotATensor()}, src)
    out = tmp_path / "out"
    result = cli("convert", src, "--arch", "test_resnet", "--out", out)
    assert_one_clear_line(result, "weights_only=True", "torch.save(model.state_dict()")
    assert not out.exists()


def test_wrong_arch_and_missing_ema_are_one_line(cli, tmp_path):
    src = tmp_path / "ckpt.pth"
    torch.save(collections.OrderedDict(_model(0).state_dict()), src)
    assert_one_clear_line(cli("convert", src, "--arch", "resnet18", "--out", tmp_path / "a"), "does not fit resnet18")
    assert_one_clear_line(cli("convert", src, "--arch", "test_resnet", "--out", tmp_path / "b", "--ema"), "no EMA")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
