"""The end-to-end path through the real CLI on tiny timm models and synthetic data."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import safetensors
import timm
import torch
from timm.data import create_transform, resolve_data_config

from conftest import DATA
from kdcli.data import open_data

FAST = ["--recipe", "kd-anchored", "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=1"]


def timm_top1(model: torch.nn.Module) -> float:
    """Top-1 on the synthetic val split using only timm's own preprocessing of the model's config."""
    transform = create_transform(**resolve_data_config({}, model=model))
    val = open_data(DATA).val
    images = torch.stack([transform(val[i][0]) for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        predictions = model.eval()(images).argmax(1)
    return 100.0 * (predictions == labels).float().mean().item()


def test_distill_end_to_end_and_timm_loads_the_student(cli, teacher_dir, tmp_path):
    out = tmp_path / "run"
    result = cli("distill", teacher_dir, "test_efficientnet", "--data", DATA, "--out", out, *FAST, "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert [s["name"] for s in report["stages"]] == ["kd", "kd-anchored"]
    assert report["stages"][1]["anchor"] == "tcp"
    assert "anchor" in report["stages"][1]["history"][0]["terms"]
    for name in ("student/model.safetensors", "student/config.json", "report.json", "report.md", "recipe.yaml"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["schema_version"] == 3

    # both of timm's loaders, no kdcli code involved
    by_folder = timm.create_model(f"local-dir:{out / 'student'}", pretrained=True)
    by_path = timm.create_model("test_efficientnet", num_classes=10, checkpoint_path=str(out / "student/model.safetensors"))
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(by_folder.eval()(x), by_path.eval()(x))

    # kdcli eval, timm's own preprocessing, and the run's final report agree exactly
    evaluated = cli("eval", out / "student", "--data", DATA, "--json").json()["student"]
    assert evaluated["top1"] == report["student"]["top1"] == timm_top1(by_folder)
    assert evaluated["top5"] == report["student"]["top5"]

    with safetensors.safe_open(str(out / "student/model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "test_efficientnet" and meta["num_classes"] == "10" and "kdcli_version" in meta
    assert meta["recipe_hash"] == report["recipe"]["hash"]
    config = json.loads((out / "student/config.json").read_text())
    assert config["architecture"] == "test_efficientnet" and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert len(config["label_names"]) == 10


def test_bare_file_with_teacher_arch_seed_and_overrides(cli, teacher_dir, tmp_path):
    bare = tmp_path / "weights.safetensors"
    bare.write_bytes((teacher_dir / "model.safetensors").read_bytes())
    out = tmp_path / "run2"
    result = cli("distill", bare, "test_efficientnet", "--teacher-arch", "test_resnet", "--data", DATA,
                 "--out", out, "--seed", "7", *FAST, "--set", "stages.1.anchor.weighting=fixed", "--json")
    assert result.code == 0, result.err
    ran = result.json()["recipe"]["resolved"]
    assert ran["seed"] == 7 and ran["stages"][1]["anchor"]["weighting"] == "fixed"
    assert "weighting: fixed" in (out / "recipe.yaml").read_text()


def test_same_seed_same_student(cli, teacher_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        result = cli("distill", teacher_dir, "test_efficientnet", "--data", DATA, "--out", tmp_path / name, *FAST,
                     "--json")
        runs.append(result.json())
    weights = [safetensors.torch.load_file(str(tmp_path / n / "student/model.safetensors")) for n in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert runs[0]["stages"][1]["history"] == [{**h, "seconds": runs[0]["stages"][1]["history"][i]["seconds"]}
                                                for i, h in enumerate(runs[1]["stages"][1]["history"])]


def test_student_from_checkpoint_with_first_stage_anchor(cli, teacher_dir, tmp_path):
    """A student starting from weights may be anchored from stage 0 (reference = its loaded weights)."""
    out = tmp_path / "run3"
    result = cli("distill", teacher_dir, teacher_dir, "--data", DATA, "--out", out, *FAST,
                 "--set", "stages.0.anchor.weighting=fixed", "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["student"]["init"].endswith("model.safetensors")
    assert report["stages"][0]["anchor"] == "fixed"


def test_train_writes_a_timm_folder(cli, teacher_dir):
    report = json.loads((teacher_dir / "report.json").read_text())
    assert report["kind"] == "train" and report["teacher"] is None
    model = timm.create_model(f"local-dir:{teacher_dir}", pretrained=True)
    assert model.num_classes == 10


def test_entry_points():
    version = subprocess.run([sys.executable, "-m", "kdcli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("kdcli ")
    helped = subprocess.run([sys.executable, "-m", "kdcli", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "distill" in helped.stdout


def test_precision_bf16_trains_on_the_cpu_under_autocast(cli, teacher_dir, tmp_path):
    """--precision bf16: the run plan says so, the steps run under CPU bf16 autocast, the losses stay finite, and
    the student is written in fp32 as always."""
    seen = []
    original = torch.autocast.__init__

    def recording(self, device_type, dtype=None, *args, **kwargs):
        seen.append((device_type, dtype))
        original(self, device_type, dtype, *args, **kwargs)

    torch.autocast.__init__ = recording
    try:
        result = cli("distill", teacher_dir, "test_resnet", "--data", DATA, "--out", tmp_path / "run", "--recipe", "kd",
                     "--set", "stages.0.epochs=1", "--precision", "bf16", "--json")
    finally:
        torch.autocast.__init__ = original
    assert result.code == 0, result.err
    assert ", bf16; a rough estimate" in result.err
    assert ("cpu", torch.bfloat16) in seen
    weights = safetensors.torch.load_file(str(tmp_path / "run/student/model.safetensors")).values()
    assert all(v.dtype == torch.float32 for v in weights if v.is_floating_point())
    assert all(math.isfinite(h["train_loss"]) for h in result.json()["stages"][0]["history"])


def test_channels_last_trains_in_nhwc_and_writes_timms_layout(cli, teacher_dir, tmp_path, monkeypatch):
    """--channels-last: the student's convolutions see NHWC batches during training; the written student is an
    ordinary contiguous timm checkpoint, and the run plan says which layout ran."""
    from kdcli.training import engine

    layouts = []
    original = engine.step_inputs

    def recording(plan, needs, batch):
        layouts.append(batch.images.is_contiguous(memory_format=torch.channels_last)
                       and next(p for p in plan.student.parameters() if p.ndim == 4)
                       .is_contiguous(memory_format=torch.channels_last))
        return original(plan, needs, batch)

    monkeypatch.setattr(engine, "step_inputs", recording)
    out = tmp_path / "run"
    result = cli("distill", teacher_dir, "test_resnet", "--data", DATA, "--out", out, "--recipe", "kd-anchored",
                 "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=1", "--channels-last", "--json")
    assert result.code == 0, result.err
    assert layouts and all(layouts) and ", channels-last; a rough estimate" in result.err
    loaded = timm.create_model(f"local-dir:{out / 'student'}", pretrained=True)
    assert math.isclose(timm_top1(loaded), result.json()["student"]["top1"], abs_tol=0.01)
