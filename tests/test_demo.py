"""`kdcli demo`: teacher, baseline and distilled student side by side (tiny data here; .ci/run runs the real one)."""

from __future__ import annotations

import json

import timm


def test_demo_trains_three_models_and_compares_them(cli, tmp_path):
    out = tmp_path / "demo"
    result = cli("demo", "--out", out, "--data", "synthetic:train=96,val=48", "--teacher", "test_resnet")
    assert result.code == 0, result.err
    for column in ("teacher", "baseline", "distilled", "joint", "supervised", "distillation vs the same"):
        assert column in result.out, column

    reports = {name: json.loads((out / name / "report.json").read_text()) for name in ("teacher", "baseline", "distilled")}
    assert reports["distilled"]["recipe"]["name"] == "joint"  # the default recipe
    assert reports["distilled"]["baseline"]["top1"] == reports["baseline"]["student"]["top1"]
    epochs = [sum(s["epochs"] for s in reports[name]["stages"]) for name in ("baseline", "distilled")]
    assert epochs[0] == epochs[1]  # the same training budget, with and without the teacher
    assert timm.create_model(f"local-dir:{out / 'distilled' / 'student'}", pretrained=True).num_classes == 10
