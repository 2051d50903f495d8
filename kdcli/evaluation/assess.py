"""The evaluation section of a report: accuracy metrics, cost and the comparison of a student with its teacher
and a baseline, all measured on the validation split in a fixed order (the same digits every time)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from kdcli import __version__
from kdcli.models.checkpoint import LoadedModel, count_params
from kdcli.evaluation.cost import count_macs, measure_speed
from kdcli.data import DataConfig, DataSource, EvalView, eval_loader
from kdcli.evaluation.metrics import accuracy_metrics, agreement, predict, reliability_bins


@dataclass
class Subject:
    """A model to assess, the preprocessing it expects and the weights file it came from."""

    loaded: LoadedModel
    config: DataConfig
    path: Path | None
    predictions: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits, labels) on val, if already computed


def run_info(device: torch.device, source: DataSource, config: DataConfig, seconds: float,
             seed: int | None = None) -> dict:
    return {
        "command": ["kdcli", *sys.argv[1:]],
        "kdcli": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "data": source.description,
        "data_config": config.pretrained_cfg(),
        "seconds": round(seconds, 2),
    }


def _logits(subject: Subject, source: DataSource, batch_size: int, workers: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if subject.predictions is not None:  # e.g. the teacher, evaluated before training by the teacher check
        return subject.predictions
    model: nn.Module = subject.loaded.model.to(device)
    return predict(model, eval_loader(EvalView(source.val, subject.config), batch_size, workers), device)


def model_entry(subject: Subject, logits: torch.Tensor, labels: torch.Tensor, device: torch.device) -> dict:
    model, path, size = subject.loaded.model, subject.path, subject.config.image_size
    speed = measure_speed(model, size, device)
    return {
        "arch": subject.loaded.arch,
        "path": str(path) if path else None,
        "params": count_params(model),
        "file_bytes": path.stat().st_size if path and path.is_file() else None,
        "input_size": size,
        **accuracy_metrics(logits, labels),
        "macs": count_macs(model, size, device),
        "latency": speed["latency"],
        "throughput": speed["throughput"],
        "reliability": reliability_bins(logits, labels),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def comparison(student: dict, teacher: dict | None, baseline: dict | None, agree: float | None) -> dict:
    """Retention, agreement and cost ratios against the teacher; metric gains over the baseline."""
    teacher = teacher or {}
    return {
        "agreement": agree,
        "retention": _ratio(None if student["top1"] is None else 100.0 * student["top1"], teacher.get("top1"))
        if teacher else None,
        "drop": _minus(teacher["top1"], student["top1"]) if teacher else None,
        "param_ratio": _ratio(teacher.get("params"), student["params"]),
        "size_ratio": _ratio(teacher.get("file_bytes"), student["file_bytes"]),
        "macs_ratio": _ratio(teacher.get("macs"), student["macs"]),
        "speedup": _ratio(teacher["latency"]["median_ms"], student["latency"]["median_ms"]) if teacher else None,
        "throughput_ratio": (_ratio(student["throughput"]["images_per_s"], teacher["throughput"]["images_per_s"])
                             if teacher else None),
        "gain": {k: _minus(student[k], baseline[k]) for k in ("top1", "top5", "nll", "ece")} if baseline else None,
    }


def assess(source: DataSource, device: torch.device, batch_size: int, workers: int, student: Subject,
           teacher: Subject | None = None, baseline: Subject | None = None) -> dict:
    """{evaluation, student, teacher, baseline, comparison} for a report; teacher and baseline may be None."""
    logits, labels = _logits(student, source, batch_size, workers, device)
    entries, agree = {"student": model_entry(student, logits, labels, device)}, None
    for role, subject in (("teacher", teacher), ("baseline", baseline)):
        entries[role] = None
        if subject is not None:
            their_logits, their_labels = _logits(subject, source, batch_size, workers, device)
            entries[role] = model_entry(subject, their_logits, their_labels, device)
            if role == "teacher":
                agree = agreement(logits, their_logits)
    return {
        "evaluation": {"split": "val", "samples": int(labels.shape[0]), "device": str(device),
                       "threads": torch.get_num_threads()},
        **entries,
        "comparison": comparison(entries["student"], entries["teacher"], entries["baseline"], agree),
    }
