"""`kdcli ablate`, several teachers and --init-from-teacher, through the real CLI on tiny models."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
import timm
import torch
from timm.models import save_for_hf
from torch import nn

from conftest import DATA
from kdcli.models.init_from_teacher import init_from_teacher
from kdcli.training.ablation import build_cells
from kdcli.training.methods import Reads
from kdcli.training.recipe import load_recipe
from kdcli.training.sources import Batch, FrozenModel, Models, TeacherEnsemble, build

EXACT_32 = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
            "crop_pct": 1.0, "crop_mode": "center"}


def _schedule(cell) -> str:
    return "+".join(str(stage.epochs) for stage in cell.recipe.stages)


def test_cells_keep_the_total_epochs_and_vary_only_what_they_name():
    base = load_recipe("smskd")
    cells = {cell.name: cell for cell in build_cells(base, 24, seed=5, teachers=2)}
    assert list(cells) == ["alone", "kd", "joint", "multi-teacher", "seq-none", "seq-fixed", "seq-tcp", "stages-2",
                           "stages-4"]
    assert {name: _schedule(cell) for name, cell in cells.items()} == {
        "alone": "24", "kd": "24", "joint": "24", "multi-teacher": "24", "seq-none": "16+4+4", "seq-fixed": "16+4+4",
        "seq-tcp": "16+4+4", "stages-2": "20+4", "stages-4": "12+4+4+4"}
    assert all(cell.recipe.seed == 5 for cell in cells.values())
    assert cells["alone"].kind == "train" and [s.method for s in cells["alone"].recipe.stages[0].losses] == ["ce"]
    assert [s.method for s in cells["joint"].recipe.stages[0].losses] == ["kd", "fitnets", "rkd"]
    assert cells["multi-teacher"].all_teachers and not cells["kd"].all_teachers
    for weighting in ("none", "fixed", "tcp"):
        stages = cells[f"seq-{weighting}"].recipe.stages
        assert [s.anchor_weighting() for s in stages] == ["none", weighting, weighting]
        # the learning rates and losses of the base's stages are kept
        assert [s.optimizer.lr for s in stages] == [s.optimizer.lr for s in base.stages]
        assert [[loss.method for loss in s.losses] for s in stages] == [[loss.method for loss in s.losses]
                                                                         for s in base.stages]
    assert [[loss.method for loss in s.losses] for s in cells["stages-4"].recipe.stages][-1] == ["kd", "pkt"]
    # the base's own length when no --epochs is given; too few epochs for the stages is refused
    assert {c.name: _schedule(c) for c in build_cells(base, None, 0, 1)}["seq-tcp"] == "8+2+2"
    with pytest.raises(Exception, match="too few"):
        build_cells(base, 2, 0, 1)


def test_ablate_runs_every_cell_per_seed_and_reuses_finished_runs(cli, teacher_dir, tmp_path, monkeypatch):
    out = tmp_path / "ablation"
    args = ["ablate", teacher_dir, "test_resnet", "--data", DATA, "--seeds", "2", "--epochs", "3", "--out", out,
            "--cells", "alone,kd,seq-tcp,stages-2"]
    first = cli(*args, "--json")
    assert first.code == 0, first.err
    summary = first.json()
    rows = {row["cell"]: row for row in summary["cells"]}
    assert list(rows) == ["alone", "kd", "seq-tcp", "stages-2"]
    for name, row in rows.items():
        reports = [json.loads((out / name / f"seed-{seed}" / "report.json").read_text()) for seed in (0, 1)]
        top1 = [r["student"]["top1"] for r in reports]
        assert [r["top1"] for r in row["runs"]] == top1
        assert row["top1_mean"] == round(statistics.fmean(top1), 2)
        assert row["top1_std"] == round(statistics.stdev(top1), 2)
        assert [r["run"]["seed"] for r in reports] == [0, 1]
        assert row["vs_alone"] == round(row["top1_mean"] - rows["alone"]["top1_mean"], 2)
    assert rows["seq-tcp"]["epochs"] == "1+1+1" and rows["stages-2"]["epochs"] == "2+1"
    assert rows["seq-tcp"]["anchor"] == ["none", "tcp", "tcp"]
    assert json.loads((out / "seq-tcp" / "seed-0" / "report.json").read_text())["kind"] == "distill"
    assert summary["teachers"][0]["arch"] == "test_resnet"
    markdown = (out / "report.md").read_text()
    assert "| `seq-tcp` |" in markdown and (out / "ablation.png").stat().st_size > 0
    assert json.loads((out / "report.json").read_text())["cells"] == summary["cells"]

    again = cli(*args)  # the same command: every run is reused, nothing is trained
    assert again.code == 0, again.err
    assert "epoch 1/" not in again.err and "seq-tcp" in again.out
    monkeypatch.chdir(teacher_dir.parent)  # the same teacher named by a relative path is the same input
    relative = cli(*[teacher_dir.name if arg == teacher_dir else arg for arg in args])
    assert relative.code == 0 and "epoch 1/" not in relative.err, relative.err

    other = cli(*args[:-2], "--epochs", "4")  # other inputs in the same folder are refused
    assert other.code == 2 and "another epochs" in other.err


def _teacher(arch: str, folder, **model_args):
    model = timm.create_model(arch, num_classes=10, **model_args)
    save_for_hf(model, folder, model_args=model_args or None, safe_serialization=True, data_config=EXACT_32)
    return model


def test_ensemble_logits_are_the_weighted_mean_and_features_come_from_teacher_0():
    torch.manual_seed(0)
    first, second = nn.Linear(4, 3), nn.Linear(4, 3)
    batch = Batch(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.arange(5), 0, 0)
    source = TeacherEnsemble([FrozenModel("teacher.0", first, ""), FrozenModel("teacher.1", second, "")], [0.25, 0.75])
    with torch.no_grad():
        expected = 0.25 * first(batch.images) + 0.75 * second(batch.images)
    assert torch.allclose(source.outputs(batch, Reads(logits=True)).logits, expected, atol=1e-6)
    models = Models(nn.Linear(4, 3), False, first, 32, more_teachers=[(second, lambda x: x)])
    built = build(1, ["teacher", "teacher.1"], models)
    assert isinstance(built["teacher"], TeacherEnsemble)
    assert built["teacher.1"].model is second and not any(p.requires_grad for p in second.parameters())


def test_several_teachers_through_distill(cli, teacher_dir, tmp_path):
    second = tmp_path / "second"
    _teacher("test_efficientnet", second)
    recipe = tmp_path / "two.yaml"
    recipe.write_text(
        "name: two\nstages:\n  - name: both\n    epochs: 1\n    losses:\n"
        "      - {method: kd}\n"
        "      - {method: rkd, teacher: 1, tap: {student: penultimate, teacher: penultimate}}\n")
    out = tmp_path / "run"
    result = cli("distill", teacher_dir, "test_resnet", "--teacher", second, "--teacher-weights", "3,1",
                 "--recipe", recipe, "--data", DATA, "--out", out, "--allow-weak-teacher", "--json")
    assert result.code == 0, result.err
    report = result.json()
    teachers = report["teachers"]
    assert [t["weight"] for t in teachers] == [0.75, 0.25, None]
    assert [t["arch"] for t in teachers] == ["test_resnet", "test_efficientnet", "test_resnet+test_efficientnet"]
    assert teachers[0]["top1"] == report["teacher"]["top1"]
    assert "teacher.1" in result.err  # the stage says what it reads
    assert report["plan"]["teachers"] == teachers

    ablation = cli("ablate", teacher_dir, "test_resnet", "--teacher", second, "--data", DATA, "--seeds", "1",
                   "--epochs", "3", "--cells", "kd,multi-teacher", "--out", tmp_path / "ablation",
                   "--allow-weak-teacher", "--json")
    assert ablation.code == 0, ablation.err
    summary = ablation.json()
    assert [t["weight"] for t in summary["teachers"]] == [0.5, 0.5, None]  # each teacher, then the ensemble
    single = json.loads((tmp_path / "ablation" / "kd" / "seed-0" / "report.json").read_text())
    assert "teachers" not in single  # the other cells distil from TEACHER alone
    assert [row["cell"] for row in summary["cells"]] == ["kd", "multi-teacher"]

    too_far = tmp_path / "three.yaml"
    too_far.write_text(recipe.read_text().replace("teacher: 1", "teacher: 2"))
    refused = cli("distill", teacher_dir, "test_resnet", "--teacher", second, "--recipe", too_far, "--data", DATA,
                  "--out", tmp_path / "no", "--allow-weak-teacher")
    assert refused.code == 2 and "there are 2 teachers" in refused.err and not (tmp_path / "no").exists()


def test_init_from_teacher_copies_every_other_block_where_shapes_fit():
    torch.manual_seed(0)
    teacher = timm.create_model("test_vit", num_classes=10, depth=12, img_size=32)
    student = timm.create_model("test_vit", num_classes=10, img_size=32)  # depth 6
    summary = init_from_teacher(student, teacher, "test_vit", "test_vit")
    assert summary["blocks"] == {"blocks": "0←0, 1←2, 2←4, 3←6, 4←8, 5←10"}
    assert summary["tensors_copied"] == summary["tensors"]
    for i in range(6):
        assert torch.equal(student.blocks[i].attn.qkv.weight, teacher.blocks[2 * i].attn.qkv.weight)
    assert torch.equal(student.patch_embed.proj.weight, teacher.patch_embed.proj.weight)
    assert torch.equal(student.head.weight, teacher.head.weight)

    wide = timm.create_model("test_resnet", num_classes=10, layers=(2, 3, 2, 2))
    narrow = timm.create_model("test_resnet", num_classes=10)  # (1, 1, 1, 1)
    summary = init_from_teacher(narrow, wide, "test_resnet", "test_resnet")
    assert summary["blocks"]["layer2"] == "0←0"
    assert torch.equal(narrow.layer2[0].conv1.weight, wide.layer2[0].conv1.weight)
    assert torch.equal(narrow.conv1[0].weight, wide.conv1[0].weight) and torch.equal(narrow.fc.weight, wide.fc.weight)


def test_init_from_teacher_through_distill(cli, tmp_path):
    teacher = tmp_path / "deep"
    model = _teacher("test_vit", teacher, depth=12, img_size=32)
    out = tmp_path / "run"
    result = cli("distill", teacher, "test_vit", "--init-from-teacher", "--data", DATA, "--out", out, "--recipe", "kd",
                 "--set", "stages.0.epochs=1", "--set", "optimizer.lr=1e-9", "--set", "optimizer.weight_decay=0", "--allow-weak-teacher", "--json")
    assert result.code == 0, result.err
    report = result.json()
    copied = report["plan"]["student"]["init_from_teacher"]
    assert copied["blocks"] == {"blocks": "0←0, 1←2, 2←4, 3←6, 4←8, 5←10"}
    assert report["student"]["init"].startswith("from teacher test_vit: ")
    student = timm.create_model("local-dir:" + str(out / "student"), pretrained=True)
    # at a vanishing learning rate the student stays at its initialisation: every other teacher block
    assert torch.allclose(student.blocks[3].mlp.fc1.weight, model.blocks[6].mlp.fc1.weight, atol=1e-6)
    assert not torch.allclose(student.blocks[3].mlp.fc1.weight, model.blocks[3].mlp.fc1.weight, atol=1e-3)
    shutil.rmtree(out)


def test_an_interrupted_ablation_continues_where_it_stopped(cli, teacher_dir, tmp_path, monkeypatch):
    from kdcli.jobs.outputs import Outputs
    from kdcli.training.trainstate import CHECKPOINT_NAME, StopSignals

    out = tmp_path / "ablation"
    args = ["ablate", teacher_dir, "test_resnet", "--data", DATA, "--seeds", "1", "--epochs", "3", "--out", out,
            "--cells", "alone,kd"]
    kd_state = Outputs(out / "kd" / "seed-0").folder / CHECKPOINT_NAME
    monkeypatch.setattr(StopSignals, "requested", lambda self: kd_state.is_file())  # stop once kd saved an epoch
    stopped = cli(*args)
    assert stopped.code == 130 and "resume with: kdcli ablate" in stopped.err, stopped.err
    assert (out / "alone" / "seed-0" / "report.json").is_file() and not (out / "kd" / "seed-0").exists()
    monkeypatch.undo()
    resumed = cli(*args)
    assert resumed.code == 0, resumed.err
    assert "alone/0: [supervised]" not in resumed.err  # finished: reused
    assert "kd/0: [response] epoch 1/3" not in resumed.err and "kd/0: [response] epoch 3/3" in resumed.err
    assert (out / "kd" / "seed-0" / "report.json").is_file() and not kd_state.exists()
