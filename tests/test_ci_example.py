"""examples/ci: the shell script a CI job runs, on tiny settings; a failing gate fails the script with exit 1."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from conftest import DATA, Result, Watched

CI = Path(__file__).resolve().parents[1] / "examples" / "ci"
# A one-epoch teacher is at chance: the test checks the script, so it lets the run go on past the teacher check.
TINY = "--set stages.0.epochs=1 --set stages.1.epochs=1 --allow-weak-teacher"


def compress(tmp_path: Path, **settings: str) -> Result:
    env = {**os.environ, "KDCLI": f"{sys.executable} -m kdcli", "DATA": DATA, "STUDENT": "test_resnet",
           "KDCLI_ARGS": TINY, "OUT": str(tmp_path / "out"), "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
           "PYTHONPATH": os.pathsep.join([str(CI.parents[1]), os.environ.get("PYTHONPATH", "")]), **settings}
    return Watched(["bash", CI / "compress.sh"], env=env).finish()


def test_trains_a_teacher_distills_and_passes(tmp_path):
    done = compress(tmp_path, TEACHER_ARCH="test_resnet", TEACHER_EPOCHS="1", MIN_TOP1="0", MAX_DROP="100")
    assert done.code == 0, done.err
    report = json.loads((tmp_path / "out/distill/report.json").read_text())
    assert report["gate"]["passed"] and report["teacher"]["arch"] == "test_resnet"
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# Distillation report")
    assert "](training.png)" not in summary and "`training.png` in the kdcli-report artifact" in summary
    assert "\x1b[" not in done.out + done.err  # not a terminal: plain lines, no escape codes


def test_failing_gate_fails_the_script_with_exit_1(tmp_path, teacher_dir):
    done = compress(tmp_path, TEACHER=str(teacher_dir), MIN_TOP1="100")
    assert done.code == 1
    assert "error: quality gate failed: student top-1" in done.err
    assert (tmp_path / "out/distill/report.md").is_file() and not (tmp_path / "out/teacher").exists()


def installs_kdcli_from_the_repository(job: dict, extra: str = "") -> None:
    """kdcli is not on PyPI: the job installs it from this checkout (or a git URL the user pins)."""
    pyproject = (CI.parents[1] / "pyproject.toml").read_text()  # what "." installs
    assert job["env"]["KDCLI_INSTALL"] == f".{extra}" and '\nname = "kdcli"\n' in pyproject
    assert not extra or f"\n{extra.strip('[]')} = [" in pyproject
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert 'pip install "$KDCLI_INSTALL"' in runs and "pip install kdcli" not in runs


def test_workflow_runs_the_script_and_uploads_the_report():
    workflow = yaml.safe_load((CI / "compress.yml").read_text())
    steps = workflow["jobs"]["compress"]["steps"]
    installs_kdcli_from_the_repository(workflow["jobs"]["compress"])
    assert any("examples/ci/compress.sh" in step.get("run", "") for step in steps)
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and "report.md" in upload["with"]["path"]


def test_one_go_distill_export_gate_job(tmp_path, teacher_dir):
    env = {**os.environ, "KDCLI": f"{sys.executable} -m kdcli", "DATA": DATA, "TEACHER": str(teacher_dir),
           "STUDENT": "test_resnet", "RECIPE": "kd-anchored", "MAX_DROP": "100", "OUT": str(tmp_path / "out"),
           "KDCLI_ARGS": TINY, "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
           "PYTHONPATH": os.pathsep.join([str(CI.parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = Watched(["bash", CI / "compress-export.sh"], env=env).finish()
    assert done.code == 0, done.err
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert [e["format"] for e in report["exports"]] == ["onnx", "int8"] and report["gate"]["passed"]
    assert (tmp_path / "out/export/model.int8.onnx").is_file()
    assert "### int8" in (tmp_path / "summary.md").read_text()
    workflow = yaml.safe_load((CI / "compress-export.yml").read_text())
    steps = workflow["jobs"]["compress-export"]["steps"]
    assert any("compress-export.sh" in step.get("run", "") for step in steps)
    installs_kdcli_from_the_repository(workflow["jobs"]["compress-export"], "[export]")
    assert "](training.png)" not in (tmp_path / "summary.md").read_text()


def test_own_data_example_end_to_end(tmp_path):
    """examples/own-data.sh as a user runs it on an ImageFolder with train/, val/ and test/: trains a teacher and a
    baseline, distils, exports to ONNX, evaluates the student and the ONNX file on the held-out test split."""
    from PIL import Image

    data = tmp_path / "data"
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        for index in range(10):
            folder = data / split / f"class_{index}"
            folder.mkdir(parents=True)
            for n in range(count):
                Image.new("RGB", (32, 32), (index * 25, n * 60, 255 - index * 25)).save(folder / f"{n}.png")
    out = tmp_path / "out"
    env = {**os.environ, "KDCLI": f"{sys.executable} -m kdcli", "DATA": str(data), "TEACHER_ARCH": "test_resnet",
           "TEACHER_EPOCHS": "1", "STUDENT": "test_resnet", "RECIPE": "kd-anchored", "BASELINE_EPOCHS": "2",
           "OUT": str(out), "DISTILL_ARGS": TINY,
           "PYTHONPATH": os.pathsep.join([str(CI.parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = Watched(["bash", CI.parent / "own-data.sh"], env=env).finish()
    assert done.code == 0, done.err
    distilled = json.loads((out / "distill/report.json").read_text())
    assert distilled["baseline"]["arch"] == "test_resnet" and distilled["exports"][0]["format"] == "onnx"
    held_out = json.loads((out / "test/report.json").read_text())
    assert held_out["evaluation"]["samples"] == 20 and str(data / "test") in held_out["run"]["data"]
    assert held_out["teacher"] and held_out["baseline"]
    onnx = json.loads((out / "test-export/report.json").read_text())
    assert onnx["student"]["format"] == "onnx" and onnx["evaluation"]["samples"] == 20
    assert (out / "distill/metrics.jsonl").is_file()
    assert f"held-out report {out}/test/report.md" in done.out
