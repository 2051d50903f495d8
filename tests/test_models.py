"""Checkpoints as the other tools write them, through the CLI: timm's save_for_hf folders, legacy single-dict
configs, a local Hugging Face Hub cache (hf-hub: names and pretrained tags, offline), pretrained students with a
new head, and preprocessing that is stated, flagged or refused -- each compared with timm's own loading."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.models import save_for_hf

from conftest import DATA, put_in_hub_cache, run_kdcli
from kdcli.data import open_data
from test_errors import assert_one_clear_line

FAST = ["--recipe", "kd-anchored", "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=1"]
EXACT_32 = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
            "crop_pct": 1.0}


def timm_metrics(model: torch.nn.Module) -> tuple[float, float]:
    """(top-1 %, NLL) on the val split, with only timm's loading and timm's preprocessing of the model's config."""
    transform = create_transform(**resolve_data_config({}, model=model))
    val = open_data(DATA).val
    images = torch.stack([transform(val[i][0]) for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model.eval()(images)
    nll = torch.nn.functional.cross_entropy(logits.double(), labels).item()
    return 100.0 * (logits.argmax(1) == labels).float().mean().item(), nll


def assert_same_as_timm(report_entry: dict, model: torch.nn.Module) -> None:
    top1, nll = timm_metrics(model)
    assert report_entry["top1"] == pytest.approx(top1, abs=1e-9)
    assert report_entry["nll"] == pytest.approx(nll, abs=1e-5)


@pytest.fixture(scope="module")
def teacher_model(teacher_dir) -> torch.nn.Module:
    return timm.create_model(f"local-dir:{teacher_dir}", pretrained=True).eval()


@pytest.fixture(scope="module")
def hf_folder(teacher_model, tmp_path_factory):
    """The session teacher as timm's own save_for_hf writes it: model_args with num_classes, in_chans, global_pool."""
    folder = tmp_path_factory.mktemp("save_for_hf") / "teacher"
    save_for_hf(teacher_model, folder, safe_serialization=True, data_config=EXACT_32)
    assert "num_classes" in json.loads((folder / "config.json").read_text())["model_args"]
    return folder


def test_save_for_hf_folder_through_eval_inspect_and_distill(cli, hf_folder, tmp_path):
    by_timm = timm.create_model(f"local-dir:{hf_folder}", pretrained=True)
    evaluated = cli("eval", hf_folder, "--data", DATA, "--json")
    assert evaluated.code == 0, evaluated.err
    assert_same_as_timm(evaluated.json()["student"], by_timm)

    inspected = cli("inspect", hf_folder, "--json")
    assert inspected.code == 0, inspected.err
    info = inspected.json()
    assert info["params"] == sum(p.numel() for p in by_timm.parameters()) and info["image_size"] == 32
    assert info["preprocessing"]["sources"]["mean"] == "config.json"

    out = tmp_path / "run"
    result = cli("distill", hf_folder, "test_efficientnet", "--data", DATA, "--out", out, *FAST, "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert_same_as_timm(report["teacher"], by_timm)
    assert report["plan"]["teacher"]["check"]["result"] == "ok"


def test_legacy_single_dict_config(cli, teacher_model, tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    safetensors.torch.save_file(teacher_model.state_dict(), str(folder / "model.safetensors"))
    legacy = {"architecture": "test_resnet", "num_classes": 10, "input_size": [3, 32, 32], "interpolation": "bilinear",
              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0,
              "labels": [f"class_{i}" for i in range(10)]}
    (folder / "config.json").write_text(json.dumps(legacy))
    by_timm = timm.create_model(f"local-dir:{folder}", pretrained=True)
    result = cli("eval", folder, "--data", DATA, "--json")
    assert result.code == 0, result.err
    assert_same_as_timm(result.json()["student"], by_timm)


def test_hub_teacher_from_the_cache_offline(cli, hf_folder, tmp_path):
    put_in_hub_cache("kdcli-tests/teacher", hf_folder)
    by_timm = timm.create_model("hf-hub:kdcli-tests/teacher", pretrained=True)  # timm, offline, same cache
    result = cli("eval", "hf-hub:kdcli-tests/teacher", "--data", DATA, "--json")
    assert result.code == 0, result.err
    assert_same_as_timm(result.json()["student"], by_timm)

    missing = cli("eval", "hf-hub:kdcli-tests/not-cached", "--data", DATA)
    assert_one_clear_line(missing, "not in the Hugging Face cache", "HF_HUB_OFFLINE")


@pytest.fixture(scope="module")
def pretrained_student():
    """timm's pretrained tag test_efficientnet.r160_in1k (1000 classes) in the local Hub cache, with weights made
    here, laid out as the Hub's timm/test_efficientnet.r160_in1k repo."""
    torch.manual_seed(3)
    model = timm.create_model("test_efficientnet.r160_in1k")
    folder = put_in_hub_cache("timm/test_efficientnet.r160_in1k", _saved(model))
    return model, folder


def _saved(model):
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="kdcli-hub-src-"))
    save_for_hf(model, folder, safe_serialization=True)
    return folder


def test_pretrained_student_with_1000_classes_distills_on_10(cli, teacher_dir, pretrained_student, tmp_path):
    model, _ = pretrained_student
    out = tmp_path / "run"
    result = cli("distill", teacher_dir, "test_efficientnet.r160_in1k", "--data", DATA, "--out", out, *FAST, "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["student"]["init"] == "pretrained test_efficientnet.r160_in1k, head reset to 10 classes"
    assert report["plan"]["student"]["init"] == report["student"]["init"]
    pre = report["plan"]["student"]["preprocessing"]
    assert pre["sources"]["mean"] == "timm's pretrained cfg of test_efficientnet.r160_in1k"
    assert pre["input_size"] == [3, 32, 32]  # the teacher's size: both see the same view
    assert "init: pretrained test_efficientnet.r160_in1k, head reset to 10 classes" in result.err  # the plan


def test_pretrained_start_keeps_the_backbone_with_a_new_head(pretrained_student):
    from kdcli.jobs.plan import ModelChoices, resolve_models

    model, _ = pretrained_student
    resolved = resolve_models("test_efficientnet.r160_in1k", None, open_data(DATA), ModelChoices(), None, seed=0)
    student = resolved.student.model.state_dict()
    source = model.state_dict()
    assert student["classifier.weight"].shape == (10, source["classifier.weight"].shape[1])
    assert all(torch.equal(student[k], v) for k, v in source.items() if not k.startswith("classifier."))


def test_train_fine_tunes_a_pretrained_name(cli, pretrained_student, tmp_path):
    result = cli("train", "test_efficientnet.r160_in1k", "--data", DATA, "--out", tmp_path / "ft", "--epochs", "1",
                 "--image-size", "32", "--json")
    assert result.code == 0, result.err
    assert result.json()["student"]["init"] == "pretrained test_efficientnet.r160_in1k, head reset to 10 classes"
    assert timm.create_model(f"local-dir:{tmp_path / 'ft'}", pretrained=True).num_classes == 10


def test_local_start_with_other_classes_needs_reset_head(cli, teacher_dir, tmp_path):
    other = tmp_path / "seven"
    save_for_hf(timm.create_model("test_resnet", num_classes=7), other, safe_serialization=True)
    refused = cli("train", other, "--data", DATA, "--out", tmp_path / "a", "--epochs", "1")
    assert_one_clear_line(refused, "has 7 classes but the data has 10", "--reset-head")
    result = cli("train", other, "--data", DATA, "--out", tmp_path / "b", "--epochs", "1", "--reset-head", "--json")
    assert result.code == 0, result.err
    assert result.json()["student"]["init"].endswith("model.safetensors, head reset to 10 classes")


def test_dry_run_prints_the_plan_and_writes_nothing(cli, teacher_dir, tmp_path):
    out = tmp_path / "never"
    result = cli("distill", teacher_dir, "test_efficientnet", "--data", DATA, "--out", out, *FAST, "--dry-run",
                 "--json")
    assert result.code == 0, result.err
    plan = result.json()["plan"]
    assert not out.exists()
    assert plan["teacher"]["preprocessing"]["sources"]["image_size"] == "config.json"
    assert plan["student"]["preprocessing"]["sources"]["image_size"] == "config.json"  # the teacher's, same view
    assert plan["student"]["init"] == "random"
    assert plan["data"]["train"] == 256 and plan["steps"]["total"] == 2 * plan["steps"]["per_epoch"]
    assert plan["estimate"]["seconds"] >= 0 and plan["teacher"]["check"]["result"] == "ok"

    text = cli("train", "test_resnet", "--data", DATA, "--out", out, "--dry-run")
    assert text.code == 0 and "plan: train" in text.out and "init: random" in text.out
    assert not out.exists()


def test_bare_teacher_is_refused_at_chance_until_its_preprocessing_is_given(cli, teacher_dir, teacher_model, tmp_path):
    """A teacher trained at std 0.005 (made exactly from the session teacher by scaling its first convolution by
    1/100), saved as a bare .safetensors without config: the guessed timm default std 0.5 puts it at chance."""
    tensors = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    tensors["conv1.0.weight"] /= 100
    bare = tmp_path / "teacher.safetensors"
    safetensors.torch.save_file(tensors, str(bare))
    args = ["distill", bare, "test_efficientnet", "--teacher-arch", "test_resnet", "--data", DATA, *FAST]
    refused = cli(*args, "--out", tmp_path / "a")
    assert_one_clear_line(refused, "no better than chance", "its preprocessing was guessed", "std (timm default",
                          "--teacher-std")
    assert not (tmp_path / "a").exists()

    result = cli(*args, "--out", tmp_path / "b", "--teacher-std", "0.005,0.005,0.005", "--json")
    assert result.code == 0, result.err
    report = result.json()
    expected = json.loads((teacher_dir / "report.json").read_text())["student"]["top1"]
    assert report["teacher"]["top1"] == expected  # its real accuracy
    assert report["plan"]["teacher"]["preprocessing"]["sources"]["std"] == "--teacher-std"
    config = json.loads((tmp_path / "b" / "student" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]


def _image_folder(root, sizes):
    from PIL import Image

    for split in ("train", "val"):
        for index in range(3):
            folder = root / split / f"c{index}"
            folder.mkdir(parents=True)
            for number, size in enumerate(sizes):
                Image.new("RGB", size, (index * 60, number * 40, 0)).save(folder / f"{number}.png")
    return root


def test_image_folder_native_size_and_mixed_sizes_in_the_plan(cli, tmp_path):
    same = _image_folder(tmp_path / "same", [(16, 16), (16, 16)])
    plan = cli("train", "test_resnet", "--data", same, "--out", tmp_path / "a", "--dry-run", "--json").json()["plan"]
    assert plan["data"]["image_sizes"] == "all 16x16"
    assert plan["student"]["preprocessing"]["input_size"] == [3, 16, 16]
    assert plan["student"]["preprocessing"]["sources"]["image_size"] == "native size of the data (all 16x16)"

    mixed = _image_folder(tmp_path / "mixed", [(16, 16), (20, 24)])
    result = cli("train", "test_resnet", "--data", mixed, "--out", tmp_path / "b", "--dry-run")
    assert result.code == 0, result.err
    assert "images 2 sizes, 16x16 to 20x24" in result.out and "timm default for test_resnet" in result.out


def test_a_config_asking_for_pretrained_weights_does_not_download(cli, hf_folder, tmp_path):
    folder = tmp_path / "asks"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    config = json.loads((hf_folder / "config.json").read_text())
    config["model_args"]["pretrained"] = True
    (folder / "config.json").write_text(json.dumps(config))
    result = cli("inspect", folder, "--json")
    assert result.code == 0, result.err
    assert result.json()["notes"] == ["ignored model_args.pretrained in config.json (kdcli loads the weights beside it)"]


def test_an_unreachable_hub_is_one_line_without_its_retry_warnings(tmp_path):
    """huggingface_hub logs a warning per retry; the command still ends in one line. The 'Hub' is a closed port on
    this machine: nothing leaves it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    result = run_kdcli("inspect", "hf-hub:someone/model", env=env)
    assert_one_clear_line(result, "is not in the Hugging Face cache", "the Hub cannot be reached")
    assert len(result.err.strip().splitlines()) == 1, result.err
