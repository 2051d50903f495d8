"""Nothing lost: a run killed at any point and resumed ends exactly like an uninterrupted one (CPU)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import yaml

from conftest import Watched, run_kdcli
from conftest import partial_of as partial
from kdcli.training.trainstate import CHECKPOINT_NAME, STATE_KEY

DATA = "synthetic:train=1024,val=128"
RECIPE = {
    "name": "three-stages",
    "data": {"batch_size": 32},
    "stages": [
        {"name": "kd", "epochs": 2, "losses": [{"method": "kd"}]},
        {"name": "tcp", "epochs": 2, "losses": [{"method": "kd", "temperature": 2}],
         "anchor": {"weighting": "tcp", "lambda": 2.0}},
        {"name": "fixed", "epochs": 2, "losses": [{"method": "kd"}, {"method": "ce", "weight": 0.5}],
         "anchor": {"weighting": "fixed", "lambda": 0.5}},
    ],
}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "three.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def command(teacher, recipe, out, *extra):
    return [sys.executable, "-m", "kdcli", "distill", str(teacher), "test_efficientnet", "--data", DATA,
            "--recipe", str(recipe), "--out", str(out), *extra]


def position(out):
    """(stage, epoch, step) of the checkpoint of the run on out, or None."""
    try:
        with safetensors.safe_open(str(partial(out) / CHECKPOINT_NAME), "pt") as handle:
            found = json.loads(handle.metadata()[STATE_KEY])["position"]
        return found["stage"], found["epoch"], found["step"]
    except (OSError, KeyError, safetensors.SafetensorError):
        return None


def run_until(args, out, target, sig=signal.SIGKILL):
    """Start kdcli, send sig as soon as its checkpoint has reached target (stage, epoch); return (code, stderr)."""
    run = Watched(args)
    reached = run.wait_until(lambda: (position(out) or (-1,))[:2] >= target)
    assert reached, f"the run ended before it could be interrupted:\n{run.err}"
    run.process.send_signal(sig)
    done = run.finish()
    assert done.code != 0, "the run finished before it could be interrupted"
    return done.code, done.err


def finish(args):
    done = run_kdcli(*args[3:])  # args: python -m kdcli ...
    assert done.code == 0, done.err
    return done


def outcome(out):
    """What must be identical: every student weight, every accuracy metric of the report and every row of
    metrics.jsonl (not wall times, latencies or throughputs, which differ between any two runs)."""
    weights = safetensors.torch.load_file(str(out / "student/model.safetensors"))
    report = json.loads((out / "report.json").read_text())
    accuracy = ("top1", "top5", "nll", "ece", "reliability", "params", "macs")
    metrics = {
        "student": [report["student"][k] for k in accuracy],
        "teacher": [report["teacher"][k] for k in accuracy],
        "agreement": report["comparison"]["agreement"],
        "stages": [[(h["epoch"], h["train_loss"], h["terms"], h["val_top1"], h["lr"]) for h in s["history"]]
                   for s in report["stages"]],
        "metrics.jsonl": [{k: v for k, v in json.loads(row).items() if k not in ("images_per_s", "seconds")}
                          for row in (out / "metrics.jsonl").read_text().splitlines()],  # one row per epoch, no repeat
    }
    return weights, metrics


@pytest.fixture(scope="module")
def uninterrupted(teacher_dir, recipe_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    finish(command(teacher_dir, recipe_file, out))
    assert not (out / CHECKPOINT_NAME).exists()  # a finished run keeps outputs, not training state
    assert not partial(out).parent.exists()  # and nothing beside them
    return outcome(out)


def assert_same(out, expected):
    weights, metrics = outcome(out)
    expected_weights, expected_metrics = expected
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights), "student weights differ"
    assert metrics == expected_metrics


@pytest.mark.parametrize("targets", [[(0, 1)], [(1, 1)], [(2, 0)], [(0, 2), (2, 1)]],
                         ids=["stage0-epoch1", "anchored-stage-mid", "stage-boundary", "killed-twice"])
def test_sigkill_then_resume_matches_uninterrupted(teacher_dir, recipe_file, tmp_path, uninterrupted, targets):
    out = tmp_path / "run"
    for target in targets:
        extra = ["--resume"] if position(out) else []
        run_until(command(teacher_dir, recipe_file, out, *extra), out, target)
        assert position(out) is not None and not (out / "student").exists()
    finish(command(teacher_dir, recipe_file, out, "--resume"))
    assert_same(out, uninterrupted)


def test_sigint_saves_exits_130_and_says_how_to_resume(teacher_dir, recipe_file, tmp_path, uninterrupted):
    out = tmp_path / "run"
    code, stderr = run_until(command(teacher_dir, recipe_file, out), out, (1, 1), sig=signal.SIGINT)
    assert code == 130
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped in stage") and "resume with: kdcli distill" in last and "--resume" in last
    assert "Traceback" not in stderr
    finish(command(teacher_dir, recipe_file, out, "--resume"))
    assert_same(out, uninterrupted)


def test_resume_refuses_other_inputs(teacher_dir, recipe_file, tmp_path, cli):
    out = tmp_path / "run"
    run_until(command(teacher_dir, recipe_file, out), out, (0, 1))
    base = ["distill", teacher_dir, "test_efficientnet", "--data", DATA, "--out", out, "--resume"]

    other_recipe = cli(*base, "--recipe", recipe_file, "--set", "stages.1.epochs=3")
    assert other_recipe.code == 2 and "the recipe differs at stages.1.epochs: 2 in the interrupted run, 3 now" in other_recipe.err

    other_teacher_dir = tmp_path / "other-teacher"
    assert cli("train", "test_resnet", "--data", DATA, "--out", other_teacher_dir, "--epochs", "1").code == 0
    other_teacher = cli("distill", other_teacher_dir, *base[2:], "--recipe", recipe_file)
    assert other_teacher.code == 2 and "the teacher's weights differ from the interrupted run's" in other_teacher.err

    other_data = cli(*[a if a != DATA else "synthetic:train=512,val=128" for a in base], "--recipe", recipe_file)
    assert other_data.code == 2 and "the data differs" in other_data.err

    assert cli(*base, "--recipe", partial(out) / "recipe.yaml").code == 0  # the recipe as it ran resumes it


def test_out_with_checkpoint_is_refused_without_resume(teacher_dir, recipe_file, tmp_path, cli):
    out = tmp_path / "run"
    run_until(command(teacher_dir, recipe_file, out), out, (0, 1))
    refused = cli("distill", teacher_dir, "test_efficientnet", "--data", DATA, "--out", out, "--recipe", recipe_file)
    assert refused.code == 2 and "has an interrupted run" in refused.err
    assert "pass --resume to continue it, or --force to start afresh" in refused.err


def test_nothing_to_resume(cli, tmp_path, teacher_dir):
    result = cli("distill", teacher_dir, "test_efficientnet", "--data", DATA, "--out", tmp_path / "new", "--resume")
    assert result.code == 2 and "nothing to resume" in result.err


def test_non_finite_loss_stops_with_exit_2_and_keeps_the_last_checkpoint(cli, teacher_dir, recipe_file, tmp_path):
    out = tmp_path / "run"
    result = cli("distill", teacher_dir, "test_efficientnet", "--data", DATA, "--recipe", recipe_file, "--out", out,
                 "--set", "stages.0.epochs=1", "--set", "stages.1.optimizer.lr=1e30")
    assert result.code == 2 and "Traceback" not in result.err
    line = result.err.strip().splitlines()[-1]
    assert line.startswith("error: stage 'tcp' epoch 1 step") and "is not finite" in line, line
    assert "loss term '" in line and "last good checkpoint is kept" in line
    assert position(out)[0] <= 1  # the state at the end of the first stage is still there
    assert not (out / "student").exists() and not (out / "report.json").exists()


# ---------------------------------------------------------------- what --resume checks

def _interrupted_train(data, out, epochs="3"):
    """A `kdcli train` run on data stopped by SIGINT once its first epoch is saved; returns its arguments."""
    args = [sys.executable, "-m", "kdcli", "train", "test_resnet", "--data", str(data), "--out", str(out),
            "--epochs", epochs]
    code, _ = run_until(args, out, (0, 1), sig=signal.SIGINT)
    assert code == 130
    return [str(a) for a in args[3:]]


def test_resume_names_what_changed_in_the_data(tmp_path, cli):
    from test_errors import image_folder

    root = image_folder(tmp_path / "data", classes=4)
    out = tmp_path / "run"
    args = _interrupted_train(root, out)

    def refused(*fragments):
        result = cli(*args, "--resume")
        assert result.code == 2, result.err
        for fragment in fragments:
            assert fragment in result.err, (fragment, result.err)

    for split in ("train", "val"):  # a renamed class folder: the labels of every class after it would shift
        (root / split / "c1").rename(root / split / "c9")
    refused("the data differs", "class 'c1' is now 'c9'", "renamed class folder")
    for split in ("train", "val"):
        (root / split / "c9").rename(root / split / "c1")

    image = root / "train" / "c2" / "0.png"
    original, stat = image.read_bytes(), image.stat()
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(image)  # other pixels, the same name
    refused("an image in train/c2 was replaced or edited")
    image.write_bytes(original)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    (root / "val" / "c3" / "1.png").write_bytes(original)
    refused("val/c3 held 1 images then, 2 now")
    (root / "val" / "c3" / "1.png").unlink()

    assert cli(*args, "--resume").code == 0  # the data as it was: resumes


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """(out, arguments) of a train run interrupted after its first epoch; copy it before changing it."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    return out, _interrupted_train("synthetic:train=512,val=32", out)


@pytest.mark.parametrize("damage", ["runner-field", "student-tensor", "optimizer-tensor", "misshapen", "position"])
def test_a_damaged_checkpoint_is_named_not_a_crash(tmp_path, cli, interrupted, damage):
    import shutil

    original, args = interrupted
    out = tmp_path / "run"
    shutil.copytree(partial(original).parent, partial(out).parent)
    args = [str(out) if a == str(original) else a for a in args]
    path = partial(out) / CHECKPOINT_NAME
    with safetensors.safe_open(str(path), "pt") as handle:
        state = json.loads(handle.metadata()[STATE_KEY])
    tensors = safetensors.torch.load_file(str(path))
    if damage == "runner-field":
        del state["runner"]
    elif damage == "student-tensor":
        del tensors["student.fc.weight"]
    elif damage == "optimizer-tensor":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("runner.optimizer.state")}
    elif damage == "misshapen":
        tensors["student.fc.weight"] = torch.zeros(3, 3)
    else:
        state["position"] = {"stage": 7, "epoch": 0, "step": 0}
    safetensors.torch.save_file(tensors, str(path), metadata={STATE_KEY: json.dumps(state)})
    result = cli(*args, "--resume")
    assert result.code == 2 and "Traceback" not in result.err, result.err
    line = result.err.strip().splitlines()[-1]
    assert line.startswith(f"error: checkpoint {path} is damaged (") and "start afresh with --force" in line, line
    assert path.is_file()  # still there: the user decides


def test_in_place_fine_tune_killed_after_its_new_weights_resumes(tmp_path, teacher_dir):
    """`kdcli train FOLDER --out FOLDER --force` killed while the new weights are evaluated resumes, and ends as
    the same fine-tune run without interruption."""
    import shutil

    folders = [tmp_path / "killed", tmp_path / "whole"]
    for folder in folders:
        shutil.copytree(teacher_dir, folder)

    def fine_tune(folder, *extra):
        return ["train", str(folder), "--data", "synthetic:train=256,val=64", "--epochs", "1", "--out", str(folder),
                *extra]

    assert run_kdcli(*fine_tune(folders[1], "--force")).code == 0
    marker = tmp_path / "evaluating"
    spy = [sys.executable, str(Path(__file__).parent / "spy.py"), "kdcli.evaluation.assess:measure_speeds", str(marker)]
    run = Watched([*spy, *fine_tune(folders[0], "--force")])
    assert run.wait_until(marker.exists), run.err
    run.process.kill()
    run.finish()
    assert (folders[0] / "model.safetensors").read_bytes() == (teacher_dir / "model.safetensors").read_bytes()
    assert run_kdcli(*fine_tune(folders[0], "--resume")).code == 0
    weights = [safetensors.torch.load_file(str(f / "model.safetensors")) for f in folders]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
