"""What a model costs to run: MACs per image (torch's flop counter), and latency and throughput measured so that
the figures can be trusted or are said not to be.

Speed is measured for all models of a report together, interleaved run by run (student, teacher, student, ...),
so that a burst of load elsewhere on the machine hits every model alike. Rounds repeat until every model's median
is stable (moves less than STABLE_WITHIN over the last rounds) or a bound on rounds and seconds is hit. A median
that did not settle, or runs spread too wide (p90 above MAX_SPREAD x median), is marked not reliable: reports then
say "not measurable reliably here" instead of a number, and no speed-up is claimed.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdcli.errors import KdcliError

STABLE_WITHIN = 0.03  # relative change of the running median over the last STABLE_ROUNDS rounds
STABLE_ROUNDS = 2
MAX_SPREAD = 1.5  # p90 / median above this: too noisy to report


@dataclass(frozen=True)
class Schedule:
    """How long to measure one kind of pass."""

    batch: int
    warmup: int  # unmeasured passes per model first
    runs_per_round: int  # measured passes per model per round, interleaved with the other models'
    min_rounds: int
    max_rounds: int
    max_seconds: float  # stop starting new rounds after this long


LATENCY = Schedule(batch=1, warmup=5, runs_per_round=10, min_rounds=3, max_rounds=30, max_seconds=15.0)
THROUGHPUT = Schedule(batch=32, warmup=2, runs_per_round=2, min_rounds=3, max_rounds=15, max_seconds=15.0)
NOT_RELIABLE = "not measurable reliably here"
TIMING_ENV = "KDCLI_TIMING_SECONDS"  # overrides max_seconds (e.g. a CI job that gates accuracy only)


def timing_seconds(default: float) -> float:
    """The bound on seconds spent on one kind of timing: KDCLI_TIMING_SECONDS, else the default."""
    value = os.environ.get(TIMING_ENV)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise KdcliError(f"{TIMING_ENV}={value}: expected seconds (a number, 0 or more); unset it for the default")
    return seconds


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int, device: torch.device | str = "cpu") -> int:
    """Multiply-accumulates of one forward pass of one image: torch's FLOP count (2 per MAC) halved."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, image_size, image_size, device=torch.device(device), dtype=dtype))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _stable(history: list[float]) -> bool:
    """The running median moved less than STABLE_WITHIN (relative) over each of the last STABLE_ROUNDS rounds."""
    if len(history) <= STABLE_ROUNDS:
        return False
    last = history[-1]
    return all(abs(last - earlier) <= STABLE_WITHIN * last for earlier in history[-1 - STABLE_ROUNDS:-1])


def measure_interleaved(passes: dict[str, Callable[[], None]], schedule: Schedule,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """Per pass name: the seconds of each measured run and whether its median settled, from runs interleaved
    across all passes: {name: {"seconds": [...], "rounds": R, "stable": bool}}."""
    for run in passes.values():
        for _ in range(schedule.warmup):
            run()
    seconds: dict[str, list[float]] = {name: [] for name in passes}
    history: dict[str, list[float]] = {name: [] for name in passes}
    started, rounds, bound = clock(), 0, timing_seconds(schedule.max_seconds)
    while rounds < schedule.max_rounds:
        for _ in range(schedule.runs_per_round):
            for name, run in passes.items():
                begin = clock()
                run()
                seconds[name].append(clock() - begin)
        rounds += 1
        for name in passes:
            history[name].append(statistics.median(seconds[name]))
        settled = rounds >= schedule.min_rounds and all(_stable(h) for h in history.values())
        if settled or clock() - started > bound:  # out of time before min_rounds: reported as not settled
            break
    return {name: {"seconds": seconds[name], "rounds": rounds, "stable": _stable(history[name])} for name in passes}


def summarize(measured: dict, schedule: Schedule) -> dict:
    """Median, p10 and p90 (ms), whether the figure can be trusted, and why not when it cannot."""
    ordered = sorted(measured["seconds"])
    median = statistics.median(ordered)
    p10, p90 = _quantile(ordered, 0.1), _quantile(ordered, 0.9)
    reasons = []
    if not measured["stable"]:
        reasons.append(f"the median did not settle within {measured['rounds']} round{'s' * (measured['rounds'] > 1)}")
    if median > 0 and p90 > MAX_SPREAD * median:
        reasons.append(f"p90 is {p90 / median:.1f}x the median")
    return {
        "batch": schedule.batch, "warmup": schedule.warmup, "runs": len(ordered), "rounds": measured["rounds"],
        "median_ms": round(1000 * median, 4), "p10_ms": round(1000 * p10, 4), "p90_ms": round(1000 * p90, 4),
        "reliable": not reasons, "note": "; ".join(reasons) or None,
    }


def measure_speeds(passes: dict[str, Callable[[int], Callable[[], None]]]) -> dict[str, dict]:
    """Latency at batch 1 and throughput at a larger batch of several models, each measured interleaved.
    passes: name -> (batch -> a call running one forward pass of that batch)."""
    latency = measure_interleaved({n: make(LATENCY.batch) for n, make in passes.items()}, LATENCY)
    batched = measure_interleaved({n: make(THROUGHPUT.batch) for n, make in passes.items()}, THROUGHPUT)
    speeds = {}
    for name in passes:
        bulk = summarize(batched[name], THROUGHPUT)
        speeds[name] = {
            "latency": summarize(latency[name], LATENCY),
            "throughput": {"batch": THROUGHPUT.batch, "runs": bulk["runs"], "rounds": bulk["rounds"],
                           "images_per_s": round(THROUGHPUT.batch / (bulk["median_ms"] / 1000), 1),
                           "reliable": bulk["reliable"], "note": bulk["note"]},
        }
    return speeds


def speedup(slow: dict, fast: dict) -> float | None:
    """slow / fast median latency, or None when either latency is not reliable."""
    if not (slow["reliable"] and fast["reliable"]) or not fast["median_ms"]:
        return None
    return slow["median_ms"] / fast["median_ms"]
