"""kdcli on several processes: two gloo processes on CPU, started by torch's own launcher (torchrun, as
`python -m torch.distributed.run`) or, where each process's own exit code and last line are checked, with the
environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

The student is test_vit: it has no batch norm, so two processes with half the global batch each compute the
same loss as one process with the whole batch, and the students agree to rounding (TOLERANCE)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from PIL import Image
from safetensors.torch import load_file

import kdcli
from conftest import DATA, Result, Watched, partial_of
from kdcli.cli import main

ROOT = Path(kdcli.__file__).parent.parent
# Not bit-exact: the gradient all-reduce averages two half-batch means where one process takes one full-batch
# mean, so float sums run in another order (about 1e-8 apart after these 24 steps; SGD momentum carries it).
TOLERANCE = 1e-5
RECIPE = """\
name: two-stage
seed: 0
data: {batch_size: 32}
optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005}
schedule: {name: cosine}
stages:
  - {name: kd, epochs: 1, losses: [{method: kd, alpha: 0.1, temperature: 4}]}
  - name: anchored
    epochs: 2
    losses: [{method: kd, alpha: 0.1, temperature: 2}]
    anchor: {weighting: tcp, tcp: true-class, lambda: 1.0, temperature: 4}
"""


def environment(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def torchrun(*args, processes: int = 2) -> Result:
    """torchrun -m kdcli ARGS, to its end (rank 0 prints progress, waited on as conftest.Watched does)."""
    return Watched([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                    "-m", "kdcli", *args], env=environment()).finish()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn(*args, processes: int = 2) -> list[Watched]:
    """The processes torchrun would start, each with its own stdout, stderr and exit code."""
    port = str(free_port())
    return [Watched([sys.executable, "-m", "kdcli", *args],
                    env=environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                                    LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for rank in range(processes)]


def ended(processes: list[Watched]) -> list[Result]:
    """Every process's ending, rank 0's first: it prints progress; the others are silent until their last line."""
    return [process.finish() for process in processes]


def error_lines(result: Result) -> list[str]:
    return [line for line in result.err.splitlines() if line.startswith("error: ")]


def assert_same_ending(results: list[Result], code: int, *fragments: str) -> str:
    """Every process exits with `code`, its last stderr line the same one error line."""
    lines = [[line for line in r.err.splitlines() if line.strip()] for r in results]
    assert [r.code for r in results] == [code] * len(results), [(r.code, r.err[-2000:]) for r in results]
    assert all(len(error_lines(r)) == 1 and found[-1] == error_lines(r)[0] for r, found in zip(results, lines)), \
        [r.err[-2000:] for r in results]
    assert len({found[-1] for found in lines}) == 1, [found[-1] for found in lines]
    assert "Traceback" not in "".join(r.err for r in results)
    for fragment in fragments:
        assert fragment in lines[0][-1], (fragment, lines[0][-1])
    return lines[0][-1]


def weights_gap(first: Path, second: Path) -> float:
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "two-stage.yaml"
    path.write_text(RECIPE)
    return path


def distill_args(teacher: Path, recipe: Path, out: Path) -> list:
    return ["distill", teacher, "test_vit", "--data", DATA, "--recipe", recipe, "--out", out]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, teacher_dir, recipe) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    assert main([str(a) for a in distill_args(teacher_dir, recipe, out)]) == 0
    return out


def test_torchrun_distill_matches_one_process(tmp_path, teacher_dir, recipe, one_process):
    out = tmp_path / "run"
    result = torchrun(*distill_args(teacher_dir, recipe, out))
    assert result.code == 0, result.err[-3000:]
    gap = weights_gap(one_process / "student" / "model.safetensors", out / "student" / "model.safetensors")
    assert gap <= TOLERANCE, gap
    one, two = (json.loads((folder / "report.json").read_text()) for folder in (one_process, out))
    for stage_one, stage_two in zip(one["stages"], two["stages"], strict=True):
        for epoch_one, epoch_two in zip(stage_one["history"], stage_two["history"], strict=True):
            assert epoch_two["val_top1"] == epoch_one["val_top1"]
            assert epoch_two["train_loss"] == pytest.approx(epoch_one["train_loss"], abs=TOLERANCE)
    assert two["student"]["top1"] == one["student"]["top1"] and two["evaluation"]["samples"] == 128
    assert two["plan"]["steps"] == {**one["plan"]["steps"], "processes": 2}
    # one writer: a single plan and one line per epoch, rank 0's
    assert result.err.count("plan: distill") == 1 and result.err.count("[anchored] epoch 2/2") == 1
    assert "global batch: 2 processes x 16" in result.err
    assert not partial_of(out).exists()


def test_distributed_eval_equals_one_process_to_the_sample(cli, teacher_dir):
    data = "synthetic:train=64,val=101"  # 101 images: blocks of 50 and 51, nothing padded
    one = cli("eval", teacher_dir, "--data", data, "--batch-size", "16", "--json")
    assert one.code == 0, one.err
    two = torchrun("eval", teacher_dir, "--data", data, "--batch-size", "16", "--json")
    assert two.code == 0, two.err[-3000:]
    one, two = one.json(), two.json()  # stdout: rank 0's report alone
    assert two["evaluation"]["samples"] == one["evaluation"]["samples"] == 101
    for metric in ("top1", "top5"):
        assert two["student"][metric] == one["student"][metric]
    assert two["student"]["nll"] == pytest.approx(one["student"]["nll"], rel=1e-6)
    assert [b["count"] for b in two["student"]["reliability"]] == [b["count"] for b in one["student"]["reliability"]]


def image_folder(root: Path, per_class: int = 24) -> Path:
    for split, count in (("train", per_class), ("val", 6)):
        for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), tuple(c + i for c in colour)).save(folder / f"{i:03d}.png")
    return root


def test_an_error_on_rank_1_only_ends_both_processes_with_one_line(tmp_path):
    """The last validation image, in rank 1's block of the split only, is truncated: after the first epoch's
    training rank 1 fails while predicting its block and rank 0 is waiting to gather them; both end alike.
    (Training images are decoded once before training, by every process, so a bad one there ends them alike
    before any step.)"""
    from kdcli.data import open_data

    root = image_folder(tmp_path / "images")
    val = open_data(str(root)).val
    path = val.files[len(val) - 1]
    path.write_bytes(path.read_bytes()[:60])  # the header survives, the pixels do not
    out = tmp_path / "out"
    results = ended(spawn("train", "test_resnet", "--data", root, "--epochs", "1", "--set", "data.batch_size=16",
                          "--out", out))
    assert_same_ending(results, 2, "cannot read image", path.name)
    assert "stage 1/1" in results[0].err and results[1].err.count("\n") == 1  # rank 1 printed only its last line
    assert not out.exists() and not partial_of(out).exists()


def test_bad_distributed_input_ends_every_process_alike(tmp_path, teacher_dir):
    """docs/errors.md: batch-not-shared-evenly, train-smaller-than-a-batch, command-not-distributed,
    export-under-torchrun."""
    uneven = spawn(*distill_args(teacher_dir, "kd", tmp_path / "out"), "--set", "data.batch_size=33")
    small = spawn("train", "test_resnet", "--data", "synthetic:train=24,val=16", "--out", tmp_path / "small")
    demo = spawn("demo", "--out", tmp_path / "demo")
    export = spawn(*distill_args(teacher_dir, "kd", tmp_path / "export"), "--export", "onnx")
    assert_same_ending(ended(uneven), 2, "data.batch_size 33 is the global batch", "--set data.batch_size=32")
    assert_same_ending(ended(small), 2, "24 images, fewer than one global batch of 64")
    assert_same_ending(ended(demo), 2, "kdcli demo runs in one process", "without torchrun")
    assert_same_ending(ended(export), 2, "--export is not available under torchrun", "kdcli export OUT/student")
    assert not any((tmp_path / name).exists() for name in ("out", "small", "demo", "export"))


def test_a_two_process_run_stopped_on_one_rank_resumes_on_one_process(cli, tmp_path, teacher_dir, recipe,
                                                                       one_process):
    out = tmp_path / "run"
    args = distill_args(teacher_dir, recipe, out)
    processes = spawn(*args)
    checkpoint = partial_of(out) / "checkpoint.safetensors"
    assert processes[0].wait_until(checkpoint.exists), processes[0].err  # the first epoch is done; two remain
    processes[1].process.send_signal(signal.SIGTERM)  # one rank only: every rank stops at the same step
    line = assert_same_ending(ended(processes), 130, "training state saved", "--resume")
    with safetensors.safe_open(str(checkpoint), framework="pt") as handle:
        state = json.loads(handle.metadata()["kdcli_state"])
    assert state["world_size"] == 2 and state["position"]["stage"] == 1, (state["position"], line)

    resumed = cli(*args, "--resume")
    assert resumed.code == 0, resumed.err
    assert "resuming a run written by 2 processes on 1" in resumed.err
    gap = weights_gap(one_process / "student" / "model.safetensors", out / "student" / "model.safetensors")
    assert gap <= TOLERANCE, gap
    report = json.loads((out / "report.json").read_text())
    assert [len(stage["history"]) for stage in report["stages"]] == [1, 2]
    assert torch.isfinite(torch.tensor(report["student"]["top1"]))
