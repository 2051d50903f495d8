"""The evaluation section of a report: accuracy metrics, cost and the comparison of a student with its teacher,
a baseline and its exported files, all measured on the validation split in a fixed order (the same digits every
time). Every model is a Subject whose Predictor may be a torch module or an ONNX Runtime session."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from kdcli import __version__
from kdcli.data import DataConfig, DataSource, EvalView, eval_loader
from kdcli.evaluation.cost import measure_speeds, speedup
from kdcli.evaluation.metrics import accuracy_metrics, agreement, reliability_bins
from kdcli.evaluation.predictors import OnnxPredictor, Predictor, TorchPredictor
from kdcli.models.checkpoint import LoadedModel
from kdcli.models.export import Exported

DTYPE_FORMATS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Subject:
    """A model to assess: what predicts its logits, the preprocessing it expects, the file it came from."""

    predictor: Predictor
    config: DataConfig
    path: Path | None
    arch: str
    format: str = "fp32"  # fp32 or fp16/bf16 (safetensors, through timm), onnx or int8 (through onnxruntime)
    details: dict = field(default_factory=dict)  # of an export: opset, quantisation, calibration sample
    predictions: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits, labels) on val, if already computed


def model_subject(loaded: LoadedModel, config: DataConfig, path: Path | None,
                  predictions: tuple[torch.Tensor, torch.Tensor] | None = None) -> Subject:
    """A timm model, run by torch in the floating dtype of its parameters; predictions: its validation logits and
    labels when they are already known (the teacher, evaluated by the teacher check before training)."""
    predictor = TorchPredictor(loaded.model)
    return Subject(predictor, config, path, loaded.arch, DTYPE_FORMATS.get(predictor.dtype, str(predictor.dtype)),
                   predictions=predictions)


def onnx_subject(exported: Exported) -> Subject:
    """An ONNX file written by kdcli export, run by ONNX Runtime."""
    return Subject(OnnxPredictor(exported.path, exported.params, exported.macs), exported.data_config, exported.path,
                   exported.arch, exported.format, exported.details)


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


def _logits(subject: Subject, source: DataSource, batch_size: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C] float32 on CPU, labels [N]) over the validation split, in order."""
    if subject.predictions is not None:
        return subject.predictions
    logits, labels = [], []
    for images, targets in eval_loader(EvalView(source.val, subject.config), batch_size, workers):
        logits.append(subject.predictor(images))
        labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def _file_bytes(path: Path | None) -> int | None:
    return path.stat().st_size if path and path.is_file() else None


def model_entry(subject: Subject, logits: torch.Tensor, labels: torch.Tensor, speed: dict) -> dict:
    predictor, size = subject.predictor, subject.config.image_size
    return {
        "arch": subject.arch,
        "path": str(subject.path) if subject.path else None,
        "format": subject.format,
        "runtime": predictor.runtime,
        "threads": predictor.threads,
        "params": predictor.params(),
        "file_bytes": _file_bytes(subject.path),
        "input_size": size,
        **accuracy_metrics(logits, labels),
        "macs": predictor.macs(size),
        **speed,
        "reliability": reliability_bins(logits, labels),
    }


def export_entry(subject: Subject, logits: torch.Tensor, labels: torch.Tensor, speed: dict, student: dict,
                 student_logits: torch.Tensor, teacher_logits: torch.Tensor | None) -> dict:
    """An exported file against the fp32 student it came from (and the teacher): accuracy, logits, speed."""
    metrics = accuracy_metrics(logits, labels)
    return {
        "format": subject.format,
        "path": str(subject.path),
        "file_bytes": _file_bytes(subject.path),
        "runtime": subject.predictor.runtime,
        "threads": subject.predictor.threads,
        "details": subject.details,
        **metrics,
        "drop_vs_fp32": _minus(student["top1"], metrics["top1"]),
        "max_abs_logit_diff": (logits - student_logits).abs().max().item(),
        "agreement_fp32": agreement(logits, student_logits),
        "agreement_teacher": agreement(logits, teacher_logits) if teacher_logits is not None else None,
        **speed,
        "speedup_vs_fp32": speedup(student["latency"], speed["latency"]),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def comparison(student: dict, teacher: dict | None, baseline: dict | None, agree: float | None) -> dict:
    """Retention, agreement and cost ratios against the teacher; metric gains over the baseline. Speed ratios
    only from reliable measurements."""
    teacher = teacher or {}
    both_reliable = teacher and student["throughput"]["reliable"] and teacher["throughput"]["reliable"]
    return {
        "agreement": agree,
        "retention": _ratio(None if student["top1"] is None else 100.0 * student["top1"], teacher.get("top1"))
        if teacher else None,
        "drop": _minus(teacher["top1"], student["top1"]) if teacher else None,
        "param_ratio": _ratio(teacher.get("params"), student["params"]),
        "size_ratio": _ratio(teacher.get("file_bytes"), student["file_bytes"]),
        "macs_ratio": _ratio(teacher.get("macs"), student["macs"]),
        "speedup": speedup(teacher["latency"], student["latency"]) if teacher else None,
        "throughput_ratio": (_ratio(student["throughput"]["images_per_s"], teacher["throughput"]["images_per_s"])
                             if both_reliable else None),
        "gain": {k: _minus(student[k], baseline[k]) for k in ("top1", "top5", "nll", "ece")} if baseline else None,
    }


def assess(source: DataSource, device: torch.device, batch_size: int, workers: int, student: Subject,
           teacher: Subject | None = None, baseline: Subject | None = None,
           exports: list[Subject] | tuple = ()) -> dict:
    """{evaluation, student, teacher, baseline, exports, comparison} for a report; teacher and baseline may be None.
    Speeds of all the models are measured together, interleaved."""
    subjects = {"student": student, "teacher": teacher, "baseline": baseline}
    subjects = {name: s for name, s in subjects.items() if s is not None}
    subjects.update({f"export {i}": s for i, s in enumerate(exports)})
    logits, labels = {}, None
    for name, subject in subjects.items():
        subject.predictor.to(device)
        logits[name], labels = _logits(subject, source, batch_size, workers)
    speeds = measure_speeds({name: (lambda batch, s=s: s.predictor.forward_pass(batch, s.config.image_size))
                             for name, s in subjects.items()})
    entries = {role: model_entry(subjects[role], logits[role], labels, speeds[role]) if role in subjects else None
               for role in ("student", "teacher", "baseline")}
    exported = [export_entry(s, logits[f"export {i}"], labels, speeds[f"export {i}"], entries["student"],
                             logits["student"], logits.get("teacher")) for i, s in enumerate(exports)]
    agree = agreement(logits["student"], logits["teacher"]) if teacher else None
    return {
        "evaluation": {"split": "val", "samples": int(labels.shape[0]), "device": str(device),
                       "threads": torch.get_num_threads()},
        **entries,
        "exports": exported,
        "comparison": comparison(entries["student"], entries["teacher"], entries["baseline"], agree),
    }
