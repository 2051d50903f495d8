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
    assert (tmp_path / "summary.md").read_text().startswith("# Distillation report")
    assert "\x1b[" not in done.out + done.err  # not a terminal: plain lines, no escape codes


def test_failing_gate_fails_the_script_with_exit_1(tmp_path, teacher_dir):
    done = compress(tmp_path, TEACHER=str(teacher_dir), MIN_TOP1="100")
    assert done.code == 1
    assert "error: quality gate failed: student top-1" in done.err
    assert (tmp_path / "out/distill/report.md").is_file() and not (tmp_path / "out/teacher").exists()


def test_workflow_runs_the_script_and_uploads_the_report():
    workflow = yaml.safe_load((CI / "compress.yml").read_text())
    steps = workflow["jobs"]["compress"]["steps"]
    assert any("examples/ci/compress.sh" in step.get("run", "") for step in steps)
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and "report.md" in upload["with"]["path"]
