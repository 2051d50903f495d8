"""The built-in multi-stage recipes through the real CLI on tiny timm models; the methods and inspect commands."""

from __future__ import annotations

import json

import safetensors
import safetensors.torch
import timm
import torch

from conftest import DATA, partial_of
from kdcli.training.recipe import builtin_names
from kdcli.training.trainstate import CHECKPOINT_NAME, StopSignals

ONE_EPOCH = ["--set", "stages.0.epochs=1", "--set", "stages.1.epochs=1", "--set", "stages.2.epochs=1"]


def test_smskd_runs_three_stages_and_the_student_loads_in_timm(cli, teacher_dir, tmp_path):
    out = tmp_path / "run"
    result = cli("distill", teacher_dir, "test_efficientnet", "--data", DATA, "--out", out, "--recipe", "smskd",
                 *ONE_EPOCH, "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["recipe"]["name"] == "smskd"
    assert [(s["name"], s["anchor"]) for s in report["stages"]] == [
        ("response", "none"), ("feature", "tcp"), ("relation", "tcp")]
    assert {"fitnets", "kd", "anchor"} <= set(report["stages"][1]["history"][0]["terms"])
    assert {"rkd", "kd", "anchor"} <= set(report["stages"][2]["history"][0]["terms"])
    model = timm.create_model(f"local-dir:{out / 'student'}", pretrained=True)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    exported = safetensors.torch.load_file(str(out / "student/model.safetensors"))
    assert not any("connector" in key for key in exported)
    assert set(exported) == set(timm.create_model("test_efficientnet", num_classes=10).state_dict())


def test_connectors_are_in_the_training_checkpoint_and_resume(cli, teacher_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []

    def stop_in_feature_stage(self):  # 256 samples / 64 = 4 steps an epoch: the 6th check is in stage 1
        calls.append(1)
        return len(calls) >= 6

    monkeypatch.setattr(StopSignals, "requested", stop_in_feature_stage)
    args = ["distill", teacher_dir, "resnet10t", "--data", DATA, "--out", out, "--recipe", "smskd", *ONE_EPOCH]
    assert cli(*args).code == 130
    with safetensors.safe_open(str(partial_of(out) / CHECKPOINT_NAME), "pt") as handle:
        keys = list(handle.keys())
    connector = [k for k in keys if k.startswith("method.1.fitnets.connectors.0.")]
    assert any(k.endswith("0.weight") for k in connector) and any(k.endswith("running_var") for k in connector)
    monkeypatch.undo()
    resumed = cli(*args, "--resume", "--json")
    assert resumed.code == 0, resumed.err
    assert not (out / CHECKPOINT_NAME).exists()
    assert not any("connector" in k for k in safetensors.torch.load_file(str(out / "student/model.safetensors")))


def test_joint_and_sequential_no_anchor_run(cli, teacher_dir, tmp_path):
    joint = cli("distill", teacher_dir, "test_convnext", "--data", DATA, "--out", tmp_path / "joint",
                "--recipe", "joint", "--set", "stages.0.epochs=1", "--json")
    assert joint.code == 0, joint.err
    (stage,) = joint.json()["stages"]
    assert {"kd", "fitnets", "rkd"} == set(stage["history"][0]["terms"])
    seq = cli("distill", teacher_dir, "mobilenetv2_050", "--data", DATA, "--out", tmp_path / "seq",
              "--recipe", "sequential-no-anchor", *ONE_EPOCH, "--json")
    assert seq.code == 0, seq.err
    assert [s["anchor"] for s in seq.json()["stages"]] == ["none", "none", "none"]
    assert "anchor" not in seq.json()["stages"][1]["history"][0]["terms"]


def test_every_builtin_recipe_validates(cli):
    names = builtin_names()
    assert {"smskd", "joint", "sequential-no-anchor", "fitnets", "at", "rkd", "sp", "pkt", "dkd", "kd-std"} <= set(names)
    result = cli("recipe", "validate", *names)
    assert result.code == 0, result.err
    assert result.out.count("ok: ") == len(names)


def test_recipe_taps_accept_both_spellings_and_reject_others(cli, tmp_path):
    shown = cli("recipe", "show", "fitnets", "--set", "stages.0.losses.1.pairs.0.student=module:layer3")
    assert shown.code == 0 and "student: module:layer3" in shown.out and "teacher: feature:-2" in shown.out
    bad = cli("recipe", "validate", "fitnets", "--set", "stages.0.losses.1.pairs.0.student=layer3")
    assert bad.code == 2
    assert "stages.0.losses.1.pairs.0.student" in bad.err and "{feature: N}" in bad.err


def test_methods_command_lists_every_method_with_defaults(cli):
    result = cli("methods", "--json")
    assert result.code == 0
    rows = {row["name"]: row for row in result.json()["methods"]}
    assert {"ce", "kd", "fitnets", "at", "rkd", "sp", "pkt", "dkd", "kd_std", "anchor"} <= set(rows)
    assert rows["fitnets"]["parameters"]["weight"]["default"] == 100
    assert rows["at"]["parameters"]["p"]["default"] == 2 and rows["at"]["parameters"]["weight"]["default"] == 1000
    assert rows["rkd"]["parameters"]["distance"]["default"] == 25 and rows["rkd"]["parameters"]["angle"]["default"] == 50
    assert rows["sp"]["parameters"]["weight"]["default"] == 3000
    assert rows["pkt"]["parameters"]["weight"]["default"] == 30000
    assert [rows["dkd"]["parameters"][k]["default"] for k in ("alpha", "beta", "temperature", "warmup")] == [1, 8, 4, 20]
    assert [rows["kd_std"]["parameters"][k]["default"] for k in ("ce_weight", "kd_weight", "temperature")] == [0.1, 9, 2]
    anchor = rows["anchor"]["parameters"]
    assert [anchor[k]["default"] for k in ("weighting", "tcp", "lambda", "temperature")] == ["tcp", "true-class", 1, 4]
    assert rows["anchor"]["reads"] == "reference logits; teacher logits"
    assert "penultimate" in rows["rkd"]["reads"] and rows["kd"]["reads"] == "teacher logits"
    table = cli("methods")
    assert table.code == 0 and "fitnets" in table.out and "kd_std" in table.out and "anchor" in table.out


def test_inspect_an_arch_and_a_checkpoint(cli, teacher_dir):
    vit = cli("inspect", "test_vit", "--image-size", "32", "--json")
    assert vit.code == 0, vit.err
    info = vit.json()
    assert info["arch"] == "test_vit" and info["image_size"] == 32 and info["params"] > 0
    by_key = {t["key"]: t for t in info["taps"]}
    assert by_key["feature:5"]["module"] == "blocks.5" and by_key["feature:5"]["shape"] == [64, 2, 2]  # tokens as a map
    assert by_key["penultimate"]["shape"] == [64]

    saved = cli("inspect", teacher_dir, "--json").json()
    assert saved["arch"] == "test_resnet" and saved["num_classes"] == 10 and saved["image_size"] == 32
    assert saved["bytes"] == (teacher_dir / "model.safetensors").stat().st_size
    layer3 = next(t for t in saved["taps"] if t["module"] == "layer3")
    assert (layer3["key"], layer3["channels"], layer3["reduction"], layer3["shape"]) == ("feature:3", 192, 16, [192, 2, 2])

    table = cli("inspect", teacher_dir)
    assert table.code == 0 and "layer3" in table.out and "feature:3" in table.out
    unknown = cli("inspect", "not_an_arch")
    assert unknown.code == 2 and "unknown timm architecture" in unknown.err
    assert json.loads(cli("inspect", "test_resnet", "--image-size", "64", "--json").out)["taps"][1]["shape"] == [32, 16, 16]


def test_default_recipe_runs_with_a_vit_student_at_32(cli, teacher_dir, tmp_path):
    out = tmp_path / "vit"
    result = cli("distill", teacher_dir, "test_vit", "--data", DATA, "--out", out, "--recipe", "smskd", *ONE_EPOCH,
                 "--json")
    assert result.code == 0, result.err
    assert [s["name"] for s in result.json()["stages"]] == ["response", "feature", "relation"]
    config = json.loads((out / "student/config.json").read_text())
    assert config["model_args"] == {"img_size": 32}
