"""A mid-epoch resume is bit-exact also for a student that draws random numbers while it trains (dropout).

The approach of test_resume.py (interrupt, resume, compare with an uninterrupted run), in one process: the stop
comes from the same StopSignals check a SIGINT trips, at a chosen step, so no waiting is involved.
"""

from __future__ import annotations

import json

import safetensors
import safetensors.torch
import timm
import torch
import yaml

from conftest import partial_of
from kdcli.training.trainstate import CHECKPOINT_NAME, STATE_KEY, StopSignals

STUDENT = "ghostnet_050"  # timm's default drop_rate 0.2: dropout before the classifier, drawn every training step
DATA = "synthetic:train=96,val=32"
RECIPE = {"name": "dropout", "data": {"batch_size": 16}, "stages": [{"name": "kd", "epochs": 2, "losses": [{"method": "kd"}]}]}


def outcome(out):
    weights = safetensors.torch.load_file(str(out / "student/model.safetensors"))
    report = json.loads((out / "report.json").read_text())
    history = [{k: v for k, v in h.items() if k != "seconds"} for s in report["stages"] for h in s["history"]]
    return weights, history, report["student"]["top1"]


def test_a_dropout_student_resumed_mid_epoch_ends_like_an_uninterrupted_run(cli, teacher_dir, tmp_path, monkeypatch):
    assert timm.create_model(STUDENT).drop_rate > 0
    recipe = tmp_path / "dropout.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))

    def distill(out, *extra):
        return cli("distill", teacher_dir, STUDENT, "--data", DATA, "--recipe", recipe, "--out", out,
                   "--allow-weak-teacher", *extra)  # 32 validation images: too few to tell the teacher from chance

    assert distill(tmp_path / "whole").code == 0
    checks = []

    def stop_mid_epoch(self):  # 96 images / 16 = 6 steps an epoch: the 9th check is before epoch 2's third step
        checks.append(1)
        return len(checks) >= 9

    out = tmp_path / "run"
    monkeypatch.setattr(StopSignals, "requested", stop_mid_epoch)
    assert distill(out).code == 130
    monkeypatch.undo()
    with safetensors.safe_open(str(partial_of(out) / CHECKPOINT_NAME), "pt") as handle:
        assert json.loads(handle.metadata()[STATE_KEY])["position"] == {"stage": 0, "epoch": 1, "step": 2}
    resumed = distill(out, "--resume")
    assert resumed.code == 0, resumed.err

    weights, history, top1 = outcome(out)
    expected_weights, expected_history, expected_top1 = outcome(tmp_path / "whole")
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights), "student weights differ"
    assert (history, top1) == (expected_history, expected_top1)
