"""SIGINT/SIGTERM in every phase of every command: exit 130, one line, nothing half-written; where a training
state was kept, the line says how to resume, and resuming finishes the run.

Each test waits on progress (a marker file that tests/spy.py creates when the phase begins, or a printed line)
before it signals, never on a fixed sleep."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import torch

from conftest import Watched, partial_of, run_kdcli

SPY = Path(__file__).parent / "spy.py"
DATA = "synthetic:train=64,val=32"


def interrupt(tmp_path, target: str, *args, sig=signal.SIGTERM):
    """Run `kdcli ARGS` with `target` spied; signal it as soon as that phase begins; return the result."""
    marker = tmp_path / "phase.started"
    run = Watched([sys.executable, SPY, target, marker, *args])
    assert run.wait_until(marker.exists), f"the phase never began:\n{run.err}"
    run.process.send_signal(sig)
    return run.finish()


def assert_interrupted(result, *fragments):
    assert result.code == 130, (result.code, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: interrupted") and "Traceback" not in result.err, result.err
    assert sum(line.startswith("error: ") for line in lines) == 1
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def nothing_beside(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_during_the_image_check_before_training(tmp_path):
    from test_errors import image_folder

    root = image_folder(tmp_path / "data")
    out = tmp_path / "run"
    result = interrupt(tmp_path, "kdcli.data.sources:read_image", "train", "test_resnet", "--data", root,
                       "--out", out, "--epochs", "1")
    assert_interrupted(result, "by SIGTERM while checking the inputs", "nothing was written")
    assert nothing_beside(out)


def test_during_the_final_evaluation_then_resume(tmp_path, teacher_dir):
    out = tmp_path / "run"
    args = ["distill", teacher_dir, "test_resnet", "--data", DATA, "--out", out, "--recipe", "kd",
            "--set", "stages.0.epochs=1", "--allow-weak-teacher"]  # 32 validation images: too few for the check
    result = interrupt(tmp_path, "kdcli.evaluation.assess:measure_speeds", *args)
    assert_interrupted(result, "while writing and evaluating the student", "the training state is kept",
                       "resume with: kdcli distill", "--resume")
    assert not out.exists()  # the student and report appear only with the finished run
    resumed = run_kdcli(*args, "--resume")
    assert resumed.code == 0, resumed.err
    assert (out / "report.md").is_file() and (out / "student" / "model.safetensors").is_file()
    assert not (out.parent / f".{out.name}.kdcli").exists()


def test_after_the_last_step_keeps_the_state(tmp_path):
    """A signal that lands when no step is left to check it still stops the run before its outputs."""
    out = tmp_path / "run"
    args = ["train", "test_resnet", "--data", DATA, "--out", out, "--epochs", "1"]
    result = interrupt(tmp_path, "kdcli.training.pipeline:StageOutcome", *args, sig=signal.SIGINT)
    assert_interrupted(result, "by SIGINT while training", "resume with: kdcli train")
    assert run_kdcli(*args, "--resume").code == 0 and (out / "model.safetensors").is_file()


def test_during_eval(tmp_path, teacher_dir):
    out = tmp_path / "eval"
    result = interrupt(tmp_path, "kdcli.evaluation.assess:measure_speeds", "eval", teacher_dir, "--data", DATA,
                       "--out", out, sig=signal.SIGINT)
    assert_interrupted(result, "by SIGINT while evaluating", "nothing was written")
    assert "--resume" not in result.err and nothing_beside(out)


def test_during_convert(tmp_path):
    import timm

    source = tmp_path / "model.pth"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), source)
    out = tmp_path / "converted"
    result = interrupt(tmp_path, "kdcli.models.convert:save_timm_folder", "convert", source, "--arch", "test_resnet",
                       "--out", out)
    assert_interrupted(result, "while converting", "nothing was written")
    assert nothing_beside(out)


def test_during_inspect(tmp_path):
    result = interrupt(tmp_path, "kdcli.models.inspection:inspect_model", "inspect", "test_resnet", sig=signal.SIGINT)
    assert_interrupted(result, "(SIGINT)")


def test_during_the_demo_leaves_nothing(tmp_path):
    out = tmp_path / "demo"
    run = Watched([sys.executable, "-m", "kdcli", "demo", "--out", out, "--data", "synthetic:train=64,val=16",
                   "--teacher", "test_resnet"])
    assert run.wait_until(lambda: "baseline: stage 1/1" in run.err), run.err  # the teacher is done, the baseline runs
    run.process.send_signal(signal.SIGTERM)
    done = run.finish()
    assert_interrupted(done, "while running the demo", "nothing was written")
    assert "--resume" not in done.err  # demo has no --resume: nothing to suggest
    assert nothing_beside(out)


def test_twice_in_training_still_resumable(tmp_path):
    """The first signal asks for a checkpoint at the next step; a second one stops at once, and the checkpoint of
    the last finished epoch is what resumes. (Two different signals: two of a kind may be delivered as one.)"""
    out = tmp_path / "run"
    args = ["train", "test_resnet", "--data", "synthetic:train=1024,val=32", "--out", out, "--epochs", "2"]
    run = Watched([sys.executable, "-m", "kdcli", *args])
    assert run.wait_until((partial_of(out) / "checkpoint.safetensors").exists), run.err  # the first epoch is saved
    run.process.send_signal(signal.SIGINT)
    run.process.send_signal(signal.SIGTERM)
    result = run.finish()
    assert result.code == 130 and "resume with: kdcli train" in result.err.splitlines()[-1], result.err
