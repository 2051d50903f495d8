"""What a model costs to run: parameters, MACs per image (torch's flop counter), latency and throughput on CPU/GPU."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdcli.models.modes import evaluating

LATENCY_WARMUP, LATENCY_RUNS = 5, 30
THROUGHPUT_BATCH, THROUGHPUT_WARMUP, THROUGHPUT_RUNS = 32, 2, 5


def _images(batch: int, size: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(batch, 3, size, size, device=device)


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int, device: torch.device | str = "cpu") -> int:
    """Multiply-accumulates of one forward pass of one image: torch's FLOP count (2 per MAC) halved."""
    with evaluating(model), FlopCounterMode(display=False) as counter:
        model(_images(1, image_size, torch.device(device)))
    return int(counter.get_total_flops()) // 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _timed_runs(model: nn.Module, images: torch.Tensor, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        model(images)
    _sync(images.device)
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        model(images)
        _sync(images.device)
        seconds.append(time.perf_counter() - started)
    return seconds


def measure_speed(model: nn.Module, image_size: int, device: torch.device) -> dict:
    """Latency at batch 1 (median and p90 over repeated runs after warm-up) and throughput at a larger batch."""
    with evaluating(model):
        single = _timed_runs(model, _images(1, image_size, device), LATENCY_WARMUP, LATENCY_RUNS)
        batch = _timed_runs(model, _images(THROUGHPUT_BATCH, image_size, device), THROUGHPUT_WARMUP, THROUGHPUT_RUNS)
    ordered = sorted(single)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {
        "latency": {
            "batch": 1, "warmup": LATENCY_WARMUP, "runs": LATENCY_RUNS,
            "median_ms": round(1000 * statistics.median(single), 4), "p90_ms": round(1000 * p90, 4),
        },
        "throughput": {
            "batch": THROUGHPUT_BATCH, "runs": THROUGHPUT_RUNS,
            "images_per_s": round(THROUGHPUT_BATCH / statistics.median(batch), 1),
        },
        "threads": torch.get_num_threads(),
    }
