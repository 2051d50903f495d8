"""Model-side speed options of one KD step, each measured against the plain step in one run, interleaved (issue 13).

    python benchmarks/model_side.py [--rounds 5] [--steps 8] [--threads 2] [--compile]

The step: a resnet18 teacher forward and a resnet10t student's forward, backward and SGD update, Hinton KD,
batch 128 of 32x32 random tensors (the data pipeline is not part of it). Variants, each changing one thing:

    plain           teacher under torch.no_grad, NCHW tensors, fp32, SGD (foreach)
    inference-mode  the teacher under torch.inference_mode (its logits cloned out for the loss)
    channels-last   both models and the batch in channels_last memory format
    fused-sgd       SGD(fused=True)
    bf16            both forwards under torch.autocast('cpu', bfloat16)
    compile         the student and teacher through torch.compile (with --compile; compile time reported apart)

Each variant's step time is the median over rounds of the mean of --steps steps after 2 warm-up steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import timm
import torch
import torch.nn.functional as F

BATCH, T, ALPHA = 128, 4.0, 0.1
VARIANTS = ["plain", "inference-mode", "channels-last", "fused-sgd", "bf16"]


class Job:
    def __init__(self, variant: str):
        torch.manual_seed(0)
        self.variant = variant
        self.student = timm.create_model("resnet10t", num_classes=10)
        self.teacher = timm.create_model("resnet18", num_classes=10).eval().requires_grad_(False)
        self.images = torch.randn(BATCH, 3, 32, 32)
        self.labels = torch.randint(0, 10, (BATCH,))
        if variant == "channels-last":
            self.student, self.teacher = (m.to(memory_format=torch.channels_last) for m in (self.student, self.teacher))
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                                         fused=True if variant == "fused-sgd" else None)
        self.compile_seconds = 0.0
        if variant == "compile":
            started = time.perf_counter()
            self.student, self.teacher = torch.compile(self.student), torch.compile(self.teacher)
            self.step()
            self.compile_seconds = time.perf_counter() - started

    def step(self) -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.variant == "bf16" else nullcontext()
        frozen = torch.inference_mode() if self.variant == "inference-mode" else torch.no_grad()
        with autocast:
            with frozen:
                teacher_logits = self.teacher(self.images)
            if self.variant == "inference-mode":
                teacher_logits = teacher_logits.clone()
            logits = self.student(self.images)
        logits, teacher_logits = logits.float(), teacher_logits.float()
        kd = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(teacher_logits / T, 1), reduction="batchmean") * T * T
        loss = ALPHA * F.cross_entropy(logits, self.labels) + (1 - ALPHA) * kd
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def timed(self, steps: int) -> float:
        for _ in range(2):
            self.step()
        started = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = VARIANTS + (["compile"] if args.compile else [])
    jobs = {variant: Job(variant) for variant in variants}
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for variant in variants:
            times[variant].append(jobs[variant].timed(args.steps))
    plain = statistics.median(times["plain"])
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}; "
          f"batch {BATCH}, resnet18 -> resnet10t, 32x32; median of {args.rounds} rounds x {args.steps} steps")
    print("| variant | ms/step | img/s | vs plain |\n|---|---:|---:|---:|")
    for variant in variants:
        seconds = statistics.median(times[variant])
        extra = f" (compiled in {jobs[variant].compile_seconds:.0f} s)" if jobs[variant].compile_seconds else ""
        print(f"| {variant}{extra} | {seconds * 1000:.0f} | {BATCH / seconds:.0f} | {plain / seconds:.2f}x |")


if __name__ == "__main__":
    main()
