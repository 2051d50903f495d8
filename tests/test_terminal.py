"""The command line as a user meets it: help, shell completion, -q/-v, progress on a terminal, metrics files."""

from __future__ import annotations

import csv
import json
import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from conftest import DATA, STALL, Watched, partial_of
from kdcli.cli import app

TINY = "synthetic:train=128,val=64"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _commands(group, path=()):
    """(command path, click command) of every command, sub-commands included."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = list(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_has_readable_help(cli, monkeypatch, path, command):
    monkeypatch.setenv("COLUMNS", "250")
    result = cli(*path, "--help")
    assert result.code == 0, result.err
    text = result.out
    arguments = [p.name.upper() for p in command.params if isinstance(p, typer.core.TyperArgument)]
    assert f"Usage: kdcli {' '.join(path)} [OPTIONS]{''.join(' ' + a for a in arguments)}" in " ".join(text.split())
    assert "<bool>" not in text and "{" not in text.split("Examples")[0]  # flags as flags
    assert "Examples" in text and f"kdcli {' '.join(path)}" in text.split("Examples")[1]
    for param in command.params:
        assert param.help, f"{' '.join(path)} {param.name} has no help"


def test_help_shows_defaults_written_in_the_help_text(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    text = " ".join(cli("distill", "--help").out.split())
    assert "[default: joint]" in text and "[default: kdcli-distill]" in text
    assert "--force write into a non-empty --out" in text  # no value after a flag


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o default -F _kdcli_completion kdcli"),
                                           ("zsh", "#compdef kdcli")])
def test_completion_script_is_generated_and_completes(shell, marker):
    chosen = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}  # the shell named, not detected
    script = subprocess.run([sys.executable, "-m", "kdcli", "--show-completion", shell], capture_output=True,
                            text=True, check=True, env=chosen).stdout
    assert marker in script and "_KDCLI_COMPLETE" in script
    # what the script asks kdcli when the user presses TAB after `kdcli dis`
    env = {**os.environ, "_KDCLI_COMPLETE": "complete_bash", "COMP_WORDS": "kdcli dis", "COMP_CWORD": "1"}
    done = subprocess.run([sys.executable, "-m", "kdcli"], env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["distill"], (done.stdout, done.stderr)


def test_quiet_prints_the_result_only(cli, tmp_path):
    result = cli("train", "test_resnet", "--data", TINY, "--epochs", "1", "--out", tmp_path / "m", "-q")
    assert result.code == 0 and result.err == ""
    assert "The model (test_resnet) reaches" in result.out and "model written to" in result.out
    assert "student" not in result.out  # kdcli train makes a model, not a student


def test_metrics_written_as_training_goes_with_verbose_progress(tmp_path, teacher_dir):
    """distill -v through two stages: metrics.jsonl has its first row while training runs, and in the end one row
    per epoch with each stage's terms, val top-1 as in report.json, lr and throughput; metrics.csv the same."""
    out = tmp_path / "run"
    run = Watched([sys.executable, "-m", "kdcli", "distill", teacher_dir, "test_efficientnet", "--data", DATA,
                   "--out", out, "--recipe", "kd-anchored", "--set", "stages.0.epochs=2", "--set",
                   "stages.1.epochs=1", "--set", "data.batch_size=16", "-v"])
    live = partial_of(out) / "metrics.jsonl"
    assert run.wait_until(lambda: live.is_file() and live.read_text().count("\n") >= 1), run.err
    assert json.loads(live.read_text().splitlines()[0])["epoch"] == 1
    result = run.finish()
    assert result.code == 0, result.err
    assert "stage 1/2 'kd'" in result.err and "stage 2/2 'kd-anchored'" in result.err
    # a line at the losses read during an epoch (its first step, then at most twice a second)
    assert re.search(r"step \d+/16 +loss \d+\.\d{4} +\d+ img/s +epoch ETA \d:\d\d:\d\d", result.err), result.err
    assert "evaluating the student, the teacher on the 128 validation images" in result.err

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    history = [(i, r) for i, stage in enumerate(report["stages"]) for r in stage["history"]]
    assert [(r["stage"], r["epoch"], r["global_epoch"]) for r in rows] == [(1, 1, 1), (1, 2, 2), (2, 1, 3)]
    for row, (index, epoch) in zip(rows, history):
        assert row["stage_name"] == report["stages"][index]["name"]
        assert {k for k in row if k.startswith("loss/")} == {f"loss/{t}" for t in epoch["terms"]}
        assert row["val_top1"] == epoch["val_top1"] and row["lr"] == epoch["lr"] and row["images_per_s"] > 0
        assert row["loss"] == pytest.approx(sum(row[f"loss/{t}"] for t in epoch["terms"]), rel=1e-6)
    assert "loss/anchor" in rows[2] and "loss/anchor" not in rows[0]
    with open(out / "metrics.csv", newline="") as table:
        assert [float(r["val_top1"]) for r in csv.DictReader(table)] == [r["val_top1"] for r in rows]
    assert "93.99999976" not in (out / "report.json").read_text()


def test_progress_on_a_terminal(tmp_path):
    """In a pseudo-terminal: the bar with stage i/n, ETA, img/s and the running loss, the stage line above it, and
    the final evaluation as a phase."""
    primary, secondary = os.openpty()
    env = {**os.environ, "COLUMNS": "200", "TERM": "xterm"}
    process = subprocess.Popen([sys.executable, "-m", "kdcli", "train", "test_resnet", "--data", TINY, "--epochs",
                                "2", "--out", tmp_path / "m"], stdin=secondary, stdout=secondary, stderr=secondary,
                               env=env, close_fds=True)
    os.close(secondary)
    chunks = []
    while True:  # read until the process closes the terminal; only silence for STALL seconds fails
        ready, _, _ = select.select([primary], [], [], STALL)
        assert ready, f"no output for {STALL} s"
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert process.wait() == 0
    text = ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))
    assert "stage 1/1 'supervised': 2 epochs of 1×ce" in text  # the stage line, also on a terminal
    assert re.search(r"stage 1/1 supervised .*[1-4]/4 ETA \d:\d\d:\d\d \d+ img/s loss \d+\.\d{4}", text), text
    assert "evaluating the model on the 64 validation images, then timing them on cpu" in text
    assert "epoch 2/2" in text


def test_tensorboard_scalars(cli, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "m"
    assert cli("train", "test_resnet", "--data", TINY, "--epochs", "2", "--out", out, "--log", "tensorboard").code == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("val/top1")] == pytest.approx([r["val_top1"] for r in rows])
    assert [e.step for e in events.Scalars("loss/ce")] == [1, 2]


def test_log_tensorboard_without_the_package_is_one_line_before_any_work(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    result = cli("train", "test_resnet", "--data", TINY, "--out", tmp_path / "m", "--log", "tensorboard")
    assert result.code == 2 and result.err.count("\n") == 1
    assert "tensorboard package is not installed; pip install 'kdcli[tensorboard]'" in result.err
    assert list(tmp_path.iterdir()) == []


def test_convert_json_names_the_weights_key(cli, tmp_path):
    import timm
    import torch

    torch.save({"state_dict": timm.create_model("test_resnet", num_classes=3).state_dict()}, tmp_path / "c.pth")
    summary = cli("convert", tmp_path / "c.pth", "--arch", "test_resnet", "--out", tmp_path / "t", "--json").json()
    assert summary["weights"] == "state_dict" and summary["prefix"] is None
    assert Path(summary["out"]).parent == tmp_path / "t"
