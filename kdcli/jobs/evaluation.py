"""`kdcli eval`: assess a checkpoint against a teacher and a baseline; write the report; apply the gate."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

from kdcli.data import open_data
from kdcli.errors import KdcliError
from kdcli.evaluation.assess import assess, run_info
from kdcli.evaluation.gate import check_gate_options, enforce, gate_result
from kdcli.evaluation.report import stamp, write_report
from kdcli.jobs.common import resolve_device, subject
from kdcli.jobs.outputs import Outputs
from kdcli.models.preprocessing import Layer


def eval_checkpoint(
    ref: str,
    data_spec: str,
    arch: str | None = None,
    *,
    batch_size: int = 256,
    workers: int = 0,
    device_name: str = "auto",
    teacher_ref: str | None = None,
    teacher_arch: str | None = None,
    baseline_ref: str | None = None,
    baseline_arch: str | None = None,
    out: Path | None = None,
    force: bool = False,
    min_top1: float | None = None,
    max_drop: float | None = None,
    threads: int | None = None,
    flags: Layer | None = None,
    teacher_flags: Layer | None = None,
) -> dict:
    """Assess a checkpoint (against a teacher and a baseline, if given); with out, write the report there.
    Applies the gate last: QualityGateFailed carries the finished report."""
    check_gate_options(min_top1, max_drop, teacher_ref is not None)
    if threads is not None and threads < 1:
        raise KdcliError(f"--threads {threads}: must be 1 or more")
    inputs = {"checkpoint": ref, "teacher": teacher_ref, "baseline": baseline_ref}
    outputs = Outputs(Path(out), force=force, data=data_spec, inputs=inputs, phase="evaluating") if out else None
    with outputs or nullcontext():
        report = _evaluate(ref, data_spec, arch, batch_size, workers, device_name, teacher_ref, teacher_arch,
                           baseline_ref, baseline_arch, threads, flags, teacher_flags)
        report["gate"] = gate_result(report, min_top1, max_drop)
        if outputs:
            report = write_report(outputs.folder, report)
        else:
            report["plots"] = {"training": None, "reliability": None}
    enforce(report)
    return report


def _evaluate(ref: str, data_spec: str, arch: str | None, batch_size: int, workers: int, device_name: str,
              teacher_ref: str | None, teacher_arch: str | None, baseline_ref: str | None, baseline_arch: str | None,
              threads: int | None, flags: Layer | None, teacher_flags: Layer | None) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        started = time.perf_counter()
        device = resolve_device(device_name)
        source = open_data(data_spec)
        student = subject(ref, arch, "checkpoint", "--arch", source, flags)
        teacher = subject(teacher_ref, teacher_arch, "teacher", "--teacher-arch", source, teacher_flags) \
            if teacher_ref else None
        baseline = subject(baseline_ref, baseline_arch, "baseline", "--baseline-arch", source) if baseline_ref else None
        evaluation = assess(source, device, batch_size, workers, student, teacher, baseline)
        return stamp({
            "kind": "eval",
            "run": run_info(device, source, student.config, time.perf_counter() - started),
            "recipe": None,
            "stages": [],
            **evaluation,
        })
    finally:
        torch.set_num_threads(previous)
