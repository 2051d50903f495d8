"""Outputs all at once or not at all (jobs/outputs.py): --force replaces a previous run only when the new one
succeeds, an unexpected failure or a full disk leaves nothing half-written, one command at a time per --out,
files that follow the umask, strict JSON whatever the numbers and the paths."""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from pathlib import Path

import pytest
import torch

from conftest import Watched, run_kdcli
from conftest import partial_of as partial
from test_errors import assert_one_clear_line, image_folder

SPY = Path(__file__).parent / "spy.py"
DATA = "synthetic:train=64,val=32"
TRAIN = ["train", "test_resnet", "--data", DATA, "--epochs", "1"]


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tmp_path, cli):
    out = tmp_path / "run"
    assert cli(*TRAIN, "--out", out).code == 0
    return out


def test_force_that_fails_leaves_the_previous_run(cli, finished):
    before = files(finished)
    assert_one_clear_line(cli(*TRAIN[:3], "synthetic:train=x", "--out", finished, "--force"), "synthetic")
    assert files(finished) == before


def test_force_interrupted_keeps_the_previous_run_until_the_new_one_is_resumed(finished):
    before = files(finished)
    args = ["train", "test_resnet", "--data", "synthetic:train=1024,val=32", "--epochs", "2", "--seed", "5",
            "--out", finished]
    run = Watched([sys.executable, "-m", "kdcli", *args, "--force"])
    assert run.wait_until(lambda: "epoch 1/2" in run.err), run.err
    run.process.send_signal(signal.SIGINT)
    stopped = run.finish()
    assert stopped.code == 130 and "resume with: kdcli train" in stopped.err, stopped.err
    assert files(finished) == before  # recipe.yaml included: the new run has not replaced anything yet
    assert run_kdcli(*args, "--resume").code == 0
    report = json.loads((finished / "report.json").read_text())
    assert report["recipe"]["resolved"]["seed"] == 5 and not partial(finished).parent.exists()


def test_an_unexpected_failure_leaves_only_what_resumes(tmp_path):
    """A kdcli bug while the report is written: exit 3, no --out at all (no report.json without report.md, no
    student without its report), and the training state kept where --resume finds it."""
    out = tmp_path / "run"
    failed = Watched([sys.executable, SPY, "kdcli.evaluation.report:render_markdown", "raise", *TRAIN,
                      "--out", out]).finish()
    assert failed.code == 3 and failed.err.splitlines()[-1].startswith("error: internal error: RuntimeError")
    assert not out.exists()
    assert sorted(p.name for p in partial(out).iterdir()) == ["checkpoint.safetensors", "recipe.yaml"]
    resumed = run_kdcli(*TRAIN, "--out", out, "--resume")
    assert resumed.code == 0, resumed.err
    assert {"model.safetensors", "report.json", "report.md"} <= set(files(out))


def _file_size_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_convert_onto_a_full_disk_leaves_nothing(tmp_path):
    import timm

    source = tmp_path / "model.pth"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), source)
    out = tmp_path / "converted"
    result = run_kdcli("convert", source, "--arch", "test_resnet", "--out", out, preexec_fn=_file_size_limit(64 * 1024))
    assert_one_clear_line(result, "cannot write", "free space")
    assert not out.exists() and not list(tmp_path.glob(".converted*"))


def test_eval_onto_a_full_disk_leaves_nothing(tmp_path, teacher_dir):
    out = tmp_path / "eval"
    result = run_kdcli("eval", teacher_dir, "--data", DATA, "--out", out, preexec_fn=_file_size_limit(8 * 1024))
    assert_one_clear_line(result, "cannot write", "free space")
    assert not out.exists() and not list(tmp_path.glob(".eval*"))


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path, cli):
    out = tmp_path / "run"
    first = Watched([sys.executable, "-m", "kdcli", "train", "test_resnet", "--data", "synthetic:train=1024,val=32",
                     "--epochs", "2", "--out", out])
    assert first.wait_until(lambda: "stage 0" in first.err), first.err
    assert_one_clear_line(cli(*TRAIN, "--out", out), f"is in use by another kdcli run (pid {first.process.pid})")
    first.process.send_signal(signal.SIGINT)
    assert first.finish().code == 130


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, cli, teacher_dir):
    out = tmp_path / "eval"
    home = tmp_path / ".eval.kdcli"
    home.mkdir()
    (home / "lock").write_text("999999\n")  # its process is gone: nobody holds the lock
    result = cli("eval", teacher_dir, "--data", DATA, "--out", out)
    assert result.code == 0, result.err
    assert (out / "report.md").is_file() and not home.exists()


def test_outputs_follow_the_umask(tmp_path):
    out = tmp_path / "run"
    done = run_kdcli(*TRAIN, "--out", out, preexec_fn=lambda: os.umask(0o027))
    assert done.code == 0, done.err
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o640}, modes  # model.safetensors included
    assert out.stat().st_mode & 0o777 == 0o750


def test_force_replaces_a_symlinked_out_through_the_link(cli, finished, tmp_path):
    link = tmp_path / "latest"
    link.symlink_to(finished)
    old = (finished / "report.json").read_bytes()
    assert cli(*TRAIN, "--seed", "1", "--out", link, "--force").code == 0
    assert link.is_symlink() and (finished / "report.json").read_bytes() != old


def _nan_model(folder: Path, teacher_dir: Path) -> Path:
    """A checkpoint whose weights are all finite but whose outputs are NaN: a negative running variance (as a
    broken export or a bad edit leaves it) makes batch norm take the square root of a negative number."""
    import shutil

    import safetensors
    import safetensors.torch

    shutil.copytree(teacher_dir, folder)
    path = folder / "model.safetensors"
    with safetensors.safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = safetensors.torch.load_file(str(path))
    tensors["bn1.running_var"] = -torch.ones_like(tensors["bn1.running_var"])
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return folder


def test_eval_json_of_non_finite_outputs_is_strict_and_says_so(cli, teacher_dir, tmp_path):
    model = _nan_model(tmp_path / "nan", teacher_dir)
    result = cli("eval", model, "--data", DATA, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out, parse_constant=lambda token: pytest.fail(f"{token} in --json output"))
    student = report["student"]
    assert student["top1"] is None and student["nll"] is None and student["non_finite_outputs"] == 32
    assert "warning: the student's outputs are not finite (NaN or infinite) on 32 of 32" in result.err
    gated = cli("eval", model, "--data", DATA, "--min-top1", "1")
    assert gated.code == 1 and "student top-1 cannot be measured: its outputs are not finite" in gated.err
    assert "outputs are not finite" in gated.out  # the headline says so too


def test_paths_that_are_not_utf8_and_names_with_newlines(tmp_path):
    """A data folder from a foreign file system, a class named with a newline: the run works, its JSON is strict
    and its files are readable; the odd characters appear escaped."""
    root = image_folder(Path(os.fsdecode(bytes(tmp_path) + b"/data-\xff")), classes=3)
    (root / "train" / "c1").rename(root / "train" / "c\n1")
    (root / "val" / "c1").rename(root / "val" / "c\n1")
    out = Path(os.fsdecode(bytes(tmp_path) + b"/run-\xfe"))
    done = run_kdcli("train", "test_resnet", "--data", root, "--epochs", "1", "--out", out, "--json")
    assert done.code == 0, done.err
    report = json.loads(done.out)
    assert "data-\\xff" in report["run"]["data"]
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["label_names"] == ["c\n1", "c0", "c2"]  # sorted: a newline sorts before digits
    assert "data-\\xff" in (out / "report.md").read_text(encoding="utf-8")
