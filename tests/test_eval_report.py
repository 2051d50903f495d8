"""Evaluation, quality gate and report through the real CLI: exit codes, schema, plots, reproducible numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import matplotlib.image
import pytest

from conftest import DATA
from kdcli.evaluation.report import report_schema

FAST = ["--recipe", "kd-anchored", "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=1"]
ACCURACY = ("top1", "top5", "nll", "ece")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def validate(report: dict) -> None:
    jsonschema.validate(report, report_schema(), cls=jsonschema.Draft202012Validator)


def accuracy(report: dict) -> dict:
    """Everything in a report that must not change between runs: accuracy metrics and agreement."""
    return {**{(role, k): report[role][k] for role in ("student", "teacher", "baseline") if report.get(role)
               for k in ACCURACY},
            "agreement": report["comparison"]["agreement"], "gain": report["comparison"]["gain"]}


@pytest.fixture(scope="module")
def distilled(teacher_dir, tmp_path_factory):
    """A distill run with a teacher, a baseline and a gate that fails: exit 1, and everything still written."""
    from kdcli.cli import main

    out = tmp_path_factory.mktemp("distill") / "run"
    code = main(["distill", str(teacher_dir), "test_efficientnet", "--data", DATA, "--out", str(out), *FAST,
                 "--baseline", str(teacher_dir), "--min-top1", "100"])
    return code, out


def test_distill_with_failing_gate_writes_everything_then_exits_1(distilled):
    code, out = distilled
    assert code == 1
    for name in ("student/model.safetensors", "report.json", "report.md", "training.png", "reliability.png"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint.safetensors").exists()
    report = json.loads((out / "report.json").read_text())
    validate(report)
    assert report["gate"] == {"min_top1": 100.0, "max_drop": None, "passed": False,
                              "failures": [f"student top-1 {report['student']['top1']:.2f} < --min-top1 100.00"]}
    comparison = report["comparison"]
    assert comparison["retention"] == pytest.approx(100 * report["student"]["top1"] / report["teacher"]["top1"])
    assert comparison["gain"]["top1"] == report["student"]["top1"] - report["baseline"]["top1"]
    assert 0 <= comparison["agreement"] <= 100 and comparison["param_ratio"] > 0
    reliable = report["student"]["latency"]["reliable"] and report["teacher"]["latency"]["reliable"]
    assert (comparison["speedup"] > 0) if reliable else (comparison["speedup"] is None)  # claimed only when reliable
    assert report["teacher"]["macs"] > 0 and report["student"]["latency"]["runs"] > 1
    assert report["exports"] == [] and report["student"]["format"] == "fp32"


def test_report_md_reads_well(distilled):
    _, out = distilled
    text = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert f"The student keeps **{report['comparison']['retention']:.1f}%** of teacher top-1" in text
    assert "at batch 1" in text and "the baseline (" in text
    for section in ("## Stages", "## Metrics", "## Cost", "| metric | student | teacher | baseline |",
                    "![validation top-1 and training loss per epoch](training.png)",
                    "![reliability diagram](reliability.png)", "Quality gate (--min-top1 100.00): **failed**"):
        assert section in text, section


def test_plots_are_valid_png(distilled):
    _, out = distilled
    for name in ("training.png", "reliability.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_eval_of_the_student_matches_the_run_exactly_twice(cli, distilled, teacher_dir, tmp_path):
    _, out = distilled
    report = json.loads((out / "report.json").read_text())
    args = ["eval", out / "student", "--data", DATA, "--teacher", teacher_dir, "--baseline", teacher_dir]
    first = cli(*args, "--json", "--out", tmp_path / "eval", "--threads", "1")
    assert first.code == 0, first.err
    evaluated = first.json()  # --json: stdout is exactly the report
    assert evaluated == json.loads((tmp_path / "eval/report.json").read_text())
    validate(evaluated)
    assert evaluated["kind"] == "eval" and evaluated["evaluation"]["threads"] == 1
    assert evaluated["plots"] == {"training": None, "reliability": "reliability.png"}
    assert (tmp_path / "eval/reliability.png").read_bytes()[:8] == PNG_MAGIC
    assert accuracy(evaluated) == accuracy(report)
    again = cli(*args, "--json")
    assert again.code == 0 and accuracy(again.json()) == accuracy(report)


def test_eval_gate_exit_codes(cli, teacher_dir, tmp_path):
    base = ["eval", teacher_dir, "--data", DATA]
    passed = cli(*base, "--min-top1", "0", "--teacher", teacher_dir, "--max-drop", "0")
    assert passed.code == 0, passed.err
    assert "quality gate: passed" in passed.out

    failed = cli(*base, "--min-top1", "100", "--out", tmp_path / "failed")
    assert failed.code == 1
    top1 = json.loads((tmp_path / "failed/report.json").read_text())["student"]["top1"]
    assert failed.err.strip().splitlines()[-1] == f"error: quality gate failed: student top-1 {top1:.2f} < --min-top1 100.00"
    assert "Evaluation on" in failed.out  # the tables are printed before the verdict

    usage = cli(*base, "--max-drop", "1", "--out", tmp_path / "usage")
    assert usage.code == 2 and "--max-drop needs a teacher" in usage.err
    assert not (tmp_path / "usage").exists()  # found before any work


def test_train_report_follows_the_schema(teacher_dir):
    report = json.loads((teacher_dir / "report.json").read_text())
    validate(report)
    assert report["teacher"] is None and report["comparison"]["retention"] is None
    assert (teacher_dir / "training.png").read_bytes()[:8] == PNG_MAGIC


def test_non_tty_output_has_no_escape_codes(teacher_dir):
    done = subprocess.run([sys.executable, "-m", "kdcli", "eval", str(teacher_dir), "--data", DATA,
                           "--teacher", str(teacher_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout + done.stderr
    assert "The student keeps 100.0% of teacher top-1" in done.stdout


def test_eval_on_a_held_out_folder_and_on_a_named_split(cli, teacher_dir, tmp_path):
    """A folder of class folders is evaluated as it is; --split test picks DATA/test/; without either, val/."""
    from PIL import Image

    root = tmp_path / "data"
    for split, count in (("train", 1), ("val", 1), ("test", 3)):
        for index in range(10):
            folder = root / split / f"class_{index}"
            folder.mkdir(parents=True)
            for n in range(count):
                Image.new("RGB", (32, 32), (index * 25, n * 80, 0)).save(folder / f"{n}.png")
    on_split = cli("eval", teacher_dir, "--data", root, "--split", "test", "--json")
    held_out = cli("eval", teacher_dir, "--data", root / "test", "--json")
    default = cli("eval", teacher_dir, "--data", root, "--json")
    assert on_split.code == held_out.code == default.code == 0, (on_split.err, held_out.err, default.err)
    assert on_split.json()["evaluation"]["samples"] == held_out.json()["evaluation"]["samples"] == 30
    assert on_split.json()["student"]["top1"] == held_out.json()["student"]["top1"]
    assert str(root / "test") in on_split.json()["run"]["data"]
    assert default.json()["evaluation"]["samples"] == 10


def test_plots_show_each_term_the_references_and_bin_counts(monkeypatch, tmp_path):
    """training.png: each weighted term beside the total, teacher and baseline lines; reliability.png: % axes and
    the number of images per bin."""
    from kdcli.evaluation import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure))
    record = lambda epoch, terms: {"epoch": epoch, "train_loss": sum(terms.values()), "terms": terms,  # noqa: E731
                                   "val_top1": 40.0 + epoch, "lr": 0.1, "seconds": 1.0}
    stages = [{"name": "kd", "epochs": 2, "history": [record(1, {"kd": 1.0}), record(2, {"kd": 0.8})]},
              {"name": "kd-anchored", "epochs": 1, "history": [record(1, {"kd": 0.5, "anchor": 0.7})]}]
    plots.training_plot(stages, tmp_path / "t.png", {"teacher": 71.5, "baseline": None})
    top, bottom = figures[0].axes
    assert {line.get_label() for line in bottom.lines} >= {"total", "kd", "anchor"}
    anchor = next(line for line in bottom.lines if line.get_label() == "anchor")
    assert list(anchor.get_xdata()) == [3] and list(anchor.get_ydata()) == [0.7]  # from the stage that adds it
    assert "teacher 71.50%" in [line.get_label() for line in top.lines]
    bins = [{"lower": i / 15, "upper": (i + 1) / 15, "count": c, "confidence": (i + 0.5) / 15 if c else None,
             "accuracy": 0.5 if c else None} for i, c in enumerate([0] * 10 + [3, 0, 40, 7, 50])]
    plots.reliability_plot({"student": bins}, tmp_path / "r.png")
    diagram, counts = figures[1].axes
    assert diagram.get_ylim() == (0, 100) and diagram.get_xlim() == (0, 100)
    assert [bar.get_height() for bar in counts.patches] == [b["count"] for b in bins]
