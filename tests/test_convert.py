"""`kdcli convert`: pickle checkpoints become timm folders through torch.load(weights_only=True) only."""

from __future__ import annotations

import collections
import json

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


def _timm_train_checkpoint(tmp_path, model: torch.nn.Module, ema: torch.nn.Module | None = None):
    """model_best.pth.tar as timm's train.py writes it: timm's own CheckpointSaver, args as an argparse.Namespace."""
    import argparse

    from timm.utils import CheckpointSaver

    args = argparse.Namespace(model="test_resnet", num_classes=7, img_size=32, input_size=None, mean=[0.5] * 3,
                              std=[0.25] * 3, interpolation="bicubic", crop_pct=1.0, crop_mode=None, epochs=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=50.0)
    path = tmp_path / "model_best.pth.tar"
    assert path.is_file()
    return path


def test_timm_train_py_checkpoint_without_arch_flag(cli, tmp_path):
    model, ema = _model(0), _model(1)
    src = _timm_train_checkpoint(tmp_path, model, ema)
    out = tmp_path / "teacher"
    result = cli("convert", src, "--out", out, "--json")
    assert result.code == 0, result.err
    summary = result.json()
    assert summary["arch"] == "test_resnet" and summary["arch_from"] == "the checkpoint's args.model"
    assert summary["also_in_file"] == ["state_dict_ema"]
    config = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert config["input_size"] == [3, 32, 32] and config["std"] == [0.25] * 3 and config["interpolation"] == "bicubic"

    by_timm = timm.create_model("test_resnet", num_classes=7)
    timm.models.load_checkpoint(by_timm, str(src), use_ema=False)  # timm's own reader of its train.py files
    converted = timm.create_model(f"local-dir:{out}", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), by_timm.eval()(x))

    with_ema = cli("convert", src, "--out", tmp_path / "ema", "--ema", "--mean", "0.4", "--json")
    assert with_ema.code == 0, with_ema.err
    timm.models.load_checkpoint(by_timm, str(src), use_ema=True)
    converted = timm.create_model(f"local-dir:{tmp_path / 'ema'}", pretrained=True)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), by_timm.eval()(x))
    assert with_ema.json()["preprocessing"]["sources"]["mean"] == "--mean"


def _lightning_checkpoint(state: dict) -> dict:
    """The layout Lightning's Trainer.save_checkpoint writes (2.x): the LightningModule's state_dict (keys prefixed
    by the attribute holding the network), loops, callbacks, optimizer states and hyper-parameters."""
    return {
        "epoch": 2, "global_step": 30, "pytorch-lightning_version": "2.5.0",
        "state_dict": {**{f"model.{k}": v for k, v in state.items()}, "criterion.pos_weight": torch.ones(7)},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max'}": {
            "best_model_score": torch.tensor(0.5), "best_model_path": "/runs/epoch=2.ckpt", "dirpath": "/runs"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"arch": "test_resnet", "lr": 0.1, "num_classes": 7},
    }


def test_lightning_checkpoint_with_prefix(cli, tmp_path):
    model = _model(0)
    src = tmp_path / "epoch=2-step=30.ckpt"
    torch.save(_lightning_checkpoint(model.state_dict()), src)
    refused = cli("convert", src, "--arch", "test_resnet", "--out", tmp_path / "a")
    assert_one_clear_line(refused, "no classifier weight 'fc.weight'", "model.", "--prefix")
    out = tmp_path / "b"
    result = cli("convert", src, "--arch", "test_resnet", "--out", out, "--prefix", "model.", "--image-size", "32")
    assert result.code == 0, result.err
    converted = timm.create_model(f"local-dir:{out}", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), model(x))


def test_preprocessing_flags_are_recorded_and_the_folder_appears_at_once(cli, tmp_path):
    src = tmp_path / "ckpt.pth"
    torch.save(_model(0).state_dict(), src)
    out = tmp_path / "out"
    assert cli("convert", src, "--arch", "test_resnet", "--out", out).code == 0  # a previous output, replaced
    result = cli("convert", src, "--arch", "test_resnet", "--out", out, "--force", "--image-size", "48",
                 "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--interpolation", "bicubic")
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert config["input_size"] == [3, 48, 48] and config["mean"] == [0.5] * 3 and config["interpolation"] == "bicubic"
    assert "mean 0.5,0.5,0.5" in result.out and "guessed" not in result.out
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind
