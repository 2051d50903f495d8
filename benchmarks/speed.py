"""Speed and peak memory of one KD job on this machine, every path measured in one run, interleaved (issue 13).

    python benchmarks/speed.py [--images 1347] [--epochs 3] [--rounds 2] [--threads 2]

The job: a resnet18 teacher (trained here for a few epochs by `kdcli train`) distilled into resnet10t by
Hinton KD, on a generated 32x32 ImageFolder (PNG files), batch 128. Paths:

    floor         teacher forward + student train step (KD loss) on preloaded, unaugmented tensors, fused SGD
    student       plain student training (CE) on preloaded tensors, fused SGD: the floor once teacher outputs are
                  stored
    kdcli         `kdcli distill --recipe kd`, fresh views every epoch, no stored outputs
    kdcli-cached  the same with data.views=K and --cache DIR (the K x N teacher outputs computed first)
    kdcli-cached-cl  the same with --channels-last
    timm          timm's LogitDistillationTask on preloaded tensors
    torchdistill  torchdistill's DistillationBox (KDLoss) on preloaded tensors, when torchdistill is installed
    smskd         `kdcli distill --recipe smskd`, 3 stages of 1 epoch: for peak memory only

Each path runs in its own process (so its peak RSS is its own), in rounds, paths interleaved; throughput is the
steady state: images per second from the first to the last loss read of every epoch (data loading included; the
first step, per-epoch validation and checkpointing not), the median over epochs and rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PATHS = ["floor", "student", "kdcli", "kdcli-cached", "kdcli-cached-cl", "timm", "torchdistill", "smskd"]
TEACHER, STUDENT, BATCH, T, ALPHA = "resnet18", "resnet10t", 128, 4.0, 0.1


def make_data(root: Path, train: int, val: int) -> None:
    from PIL import Image

    from kdcli.data.synthetic import synthetic_images

    for split, count, seed in (("train", train, 1), ("val", val, 2)):
        images, labels = synthetic_images(count, split_seed=seed)
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index}.png")


def preloaded(data: Path):
    """The train split decoded and normalised once, as the reference loops read it."""
    import torch

    from kdcli.data import DataConfig, TrainView, open_data

    view = TrainView(open_data(str(data)).train, DataConfig(32, (0.5,) * 3, (0.5,) * 3), False, "none", 0)
    images, labels, _ = view.__getitems__(list(range(len(view))))
    return images.contiguous(), labels, torch


class Steps:
    """When steps were done, per epoch: (time, images) each time kdcli read its losses back (every step for the
    reference loops)."""

    def __init__(self):
        self.epochs: list[list[tuple[float, int]]] = []
        self.started = None

    def stage_started(self, plan, steps_per_epoch):
        self.started = self.started or time.perf_counter()
        self.epochs.append([])

    def steps_done(self, steps):
        self.epochs[-1].append((time.perf_counter(), sum(images for images, _ in steps)))

    def epoch_done(self, record):
        self.epochs.append([])

    def throughput(self) -> list[float]:
        """Per epoch: the images done after its first read, over the time from its first to its last read."""
        return [sum(images for _, images in e[1:]) / (e[-1][0] - e[0][0]) for e in self.epochs if len(e) > 1]


def reference_loop(path: str, data: Path, teacher_dir: Path, epochs: int) -> dict:
    images, labels, torch = preloaded(data)
    import timm
    import torch.nn.functional as F

    torch.manual_seed(0)
    student = timm.create_model(STUDENT, num_classes=10)
    teacher = timm.create_model(f"local-dir:{teacher_dir}", pretrained=True).eval().requires_grad_(False)
    fused = path in ("floor", "student")  # floors update as fast as torch can; timm, torchdistill as users run them
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, fused=fused or None)
    step = _step_function(path, student, teacher, optimizer, torch, F)
    steps = Steps()
    for epoch in range(epochs):
        steps.epochs.append([])
        student.train()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(order) - BATCH + 1, BATCH):
            batch = order[start:start + BATCH]
            step(images[batch], labels[batch])
            steps.steps_done([(BATCH, 0.0)])
    return {"img_s": steps.throughput()}


def _step_function(path, student, teacher, optimizer, torch, F):
    if path == "timm":
        from timm.task.distillation import LogitDistillationTask

        task = LogitDistillationTask(student, teacher, criterion=torch.nn.CrossEntropyLoss(), task_loss_weight=ALPHA,
                                     temperature=T, verbose=False)

        def step(x, y):
            loss = task(x, y)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step
    if path == "torchdistill":
        return _torchdistill_step(student, teacher, torch)

    def step(x, y):
        logits = student(x)
        loss = F.cross_entropy(logits, y)
        if path == "floor":
            with torch.no_grad():
                soft = F.softmax(teacher(x) / T, dim=1)
            kd = F.kl_div(F.log_softmax(logits / T, dim=1), soft, reduction="batchmean") * T * T
            loss = ALPHA * loss + (1 - ALPHA) * kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def _torchdistill_step(student, teacher, torch):
    """torchdistill's DistillationBox with its KDLoss (its alpha weighs the soft term: 0.9 there is kdcli's alpha
    0.1 on CE), driven batch by batch as its own loop drives it (forward_process, post_forward_process)."""
    from torchdistill.core.distillation import get_distillation_box

    dataset = torch.utils.data.TensorDataset(torch.zeros(BATCH, 3, 32, 32), torch.zeros(BATCH, dtype=torch.long))
    config = {
        "num_epochs": 1,
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": torch.utils.data.SequentialSampler,
                                                                  "kwargs": {}},
                              "kwargs": {"batch_size": BATCH}, "requires_supp": False},
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [],
                    "forward_hook": {"input": [], "output": []}, "wrapper": None, "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [], "frozen_modules": [],
                    "forward_hook": {"input": [], "output": []}, "wrapper": None, "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": {
            "key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                        "teacher_module_path": ".", "teacher_module_io": "output",
                                        "temperature": T, "alpha": 1 - ALPHA, "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }
    box = get_distillation_box(teacher, student, {"train": dataset}, config, torch.device("cpu"), None, False, 1)
    box.pre_epoch_process(epoch=0)

    def step(x, y):
        loss = box.forward_process(x, y, {})
        box.post_forward_process(loss=loss)
    return step


def kdcli_run(path: str, data: Path, teacher_dir: Path, epochs: int, work: Path, views: int) -> dict:
    from kdcli.jobs.plan import ModelChoices
    from kdcli.jobs.training import finish, prepare, train
    from kdcli.training.recipe import load_recipe

    sets = [f"stages.0.epochs={epochs}", f"data.batch_size={BATCH}"]
    name = "kd"
    cached = path.startswith("kdcli-cached")
    if cached:
        sets.append(f"data.views={views}")
    if path == "smskd":
        name, sets = "smskd", [f"stages.{i}.epochs=1" for i in range(3)] + [f"data.batch_size={BATCH}"]
    out = Path(tempfile.mkdtemp(dir=work))
    (out / "run").mkdir()
    cache = str(out / "cache") if cached else "off"
    run = prepare(load_recipe(name, sets), STUDENT, str(data), out / "run", teacher_ref=str(teacher_dir),
                  choices=ModelChoices(allow_weak_teacher=True), device_name="cpu", cache=cache,
                  channels_last=path == "kdcli-cached-cl")
    steps = Steps()
    started = time.perf_counter()
    report = finish(run, train(run, steps))
    return {"img_s": steps.throughput(), "top1": report["student"]["top1"],
            "precompute_s": steps.started - started if cached else None}


def one(args) -> None:
    """Measure one path in this process; print its figures as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.one in ("floor", "student", "timm", "torchdistill"):
        result = reference_loop(args.one, work / "data", work / "teacher", args.epochs)
    else:
        result = kdcli_run(args.one, work / "data", work / "teacher", args.epochs, work, args.views)
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["torch"] = torch.__version__
    print(json.dumps(result))


def setup(work: Path, args) -> None:
    """The data and a trained teacher (run in a process of its own: the parent stays small, and a child's peak
    RSS counts from its parent's size at fork)."""
    from kdcli.cli import main

    make_data(work / "data", args.images, args.val_images)
    code = main(["train", TEACHER, "--data", str(work / "data"), "--out", str(work / "teacher"), "--epochs",
                 str(args.teacher_epochs), "--set", f"data.batch_size={BATCH}", "--json"])
    assert code == 0, "training the teacher failed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1347)
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--views", type=int, default=4, help="data.views of the cached path")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup:
        return setup(Path(args.work), args)
    if args.one:
        return one(args)
    paths = args.paths.split(",")
    if importlib.util.find_spec("torchdistill") is None:
        print("torchdistill is not installed (pip install 'kdcli[bench]'): its row is skipped", file=sys.stderr)
        paths = [p for p in paths if p != "torchdistill"]
    with tempfile.TemporaryDirectory(prefix="kdcli-bench-") as tmp:
        work = Path(tmp)
        common = ["--work", str(work), "--images", str(args.images), "--val-images", str(args.val_images),
                  "--teacher-epochs", str(args.teacher_epochs)]
        subprocess.run([sys.executable, __file__, "--setup", *common], check=True, stdout=subprocess.DEVNULL)
        results: dict[str, list[dict]] = {p: [] for p in paths}
        for round_ in range(args.rounds):
            for path in paths:
                command = [sys.executable, __file__, "--one", path, "--work", str(work), "--epochs", str(args.epochs),
                           "--threads", str(args.threads), "--views", str(args.views)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{path} failed:\n{done.stderr[-3000:]}")
                results[path].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"round {round_ + 1} {path}: {results[path][-1]}", file=sys.stderr)
    print_table(results, args)


def print_table(results: dict[str, list[dict]], args) -> None:
    import platform

    rates = {p: [v for r in rs for v in r["img_s"]] for p, rs in results.items() if p != "smskd"}
    speed = {p: statistics.median(v) for p, v in rates.items() if v}  # none when an epoch has a single step
    peak = {p: max(r["peak_mib"] for r in rs) for p, rs in results.items()}
    print(f"\n{TEACHER} -> {STUDENT}, {args.images} 32x32 PNGs, batch {BATCH}, {args.threads} threads, "
          f"{args.epochs} epochs x {args.rounds} rounds; torch {next(iter(results.values()))[0]['torch']}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| path | img/s | time vs floor | peak MiB | val top-1 |")
    print("|---|---:|---:|---:|---:|")
    for path in results:
        top1 = [r["top1"] for r in results[path] if r.get("top1") is not None]
        rate = speed.get(path)
        versus = f"{speed['floor'] / rate:.2f}x" if rate and "floor" in speed else "-"
        accuracy = f"{np.mean(top1):.2f}" if top1 else "-"
        print(f"| {path} | {f'{rate:.0f}' if rate else '-'} | {versus} | {peak[path]:.0f} | {accuracy} |")
    ratios = []
    if {"kdcli", "floor"} <= speed.keys():
        ratios.append(f"kdcli uncached epoch time / compute floor: {speed['floor'] / speed['kdcli']:.2f} "
                      "(goal <= 1.10)")
    if {"kdcli-cached", "student"} <= speed.keys():
        ratios.append(f"kdcli cached / plain student training time: {speed['student'] / speed['kdcli-cached']:.2f} "
                      "(goal <= 1.10)")
    for path in ("kdcli-cached", "kdcli-cached-cl"):
        if {path, "torchdistill"} <= speed.keys():
            ratios.append(f"{path} / torchdistill throughput: {speed[path] / speed['torchdistill']:.2f} (goal >= 1.5)")
    if {"smskd", "kdcli"} <= peak.keys():
        ratios.append(f"3-stage smskd / single-stage kd peak memory: {peak['smskd'] / peak['kdcli']:.2f} "
                      "(goal <= 1.25)")
    cached = [r["precompute_s"] for r in results.get("kdcli-cached", []) if r.get("precompute_s")]
    if cached:
        ratios.append(f"storing {args.views} views of teacher outputs took {np.median(cached):.1f} s before the first "
                      "step")
    for line in ratios:
        print(f"- {line}")


if __name__ == "__main__":
    main()
