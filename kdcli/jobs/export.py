"""`kdcli export` and `distill --export`: write the student as ONNX, int8 ONNX and half-precision safetensors,
then check every file against the fp32 student (on the validation split when there is data).

Every file is read back as `kdcli eval` would read it (ONNX through onnxruntime, half-precision folders through
timm), so what the report measures is what was written.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch

from kdcli.data import DataConfig, DataSource, EvalView, open_data
from kdcli.errors import KdcliError
from kdcli.evaluation.assess import Subject, assess, model_subject, onnx_subject, run_info
from kdcli.evaluation.cost import count_macs
from kdcli.evaluation.gate import check_gate_options, enforce, gate_result
from kdcli.evaluation.metrics import agreement
from kdcli.evaluation.report import stamp, write_report
from kdcli.jobs.common import resolve_device, subject
from kdcli.models.checkpoint import LoadedModel, count_params, load_checkpoint
from kdcli.models.export import (
    HALF_DTYPES, INT8_NAME, ONNX_NAME, Exported, export_onnx, parse_formats, quantize_int8, read_onnx, require_extra,
    save_half,
)
from kdcli.jobs.outputs import Outputs, public
from kdcli.models.preprocessing import native_layer, own_preprocessing

CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 32
CHECK_IMAGES = 64  # inputs of the fp32 ONNX check, and of the whole check without --data
ONNX_TOLERANCE = 1e-3  # fp32 ONNX vs torch: max |Δlogit| <= this x max(1, max |logit|)


def check_request(formats_text: str | None, has_data: bool, flag: str = "--format") -> list[str]:
    """The formats asked for, after checking what they need (found before any work is done)."""
    if not formats_text:
        return []
    formats = parse_formats(formats_text, flag)
    if {"onnx", "int8"} & set(formats):
        require_extra(f"exporting {' and '.join(f for f in formats if f in ('onnx', 'int8'))}")
    if "int8" in formats and not has_data:
        raise KdcliError(f"{flag} int8 calibrates on training images; pass --data (the data the student was "
                         "trained on)")
    return formats


def calibration_batches(source: DataSource, config: DataConfig, images: int, seed: int) -> tuple[list, dict]:
    """A seeded sample of training images, preprocessed as for evaluation (no augmentation), in batches."""
    order = torch.randperm(len(source.train), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    view = EvalView(source.train, config)
    batches = [torch.stack([view[i][0] for i in order[at:at + CALIBRATION_BATCH]])
               for at in range(0, len(order), CALIBRATION_BATCH)]
    return batches, {"split": "train", "images": len(order), "seed": seed, "preprocessing": "evaluation transform"}


def _check_images(source: DataSource | None, config: DataConfig) -> tuple[torch.Tensor, str]:
    if source is not None:
        view = EvalView(source.val, config)
        count = min(CHECK_IMAGES, len(view))
        return torch.stack([view[i][0] for i in range(count)]), f"the first {count} validation images"
    generator = torch.Generator().manual_seed(0)
    size = config.image_size
    return torch.randn(CHECK_IMAGES, 3, size, size, generator=generator), f"{CHECK_IMAGES} seeded random inputs"


def _check_onnx(loaded: LoadedModel, exported: Exported, images: torch.Tensor, where: str) -> None:
    """The fp32 ONNX file must reproduce the torch model's logits; a file that does not is removed."""
    with torch.no_grad():
        expected = loaded.model(images)
    actual = onnx_subject(exported).predictor(images)
    worst, scale = (actual - expected).abs().max().item(), max(1.0, expected.abs().max().item())
    if not worst <= ONNX_TOLERANCE * scale:
        exported.path.unlink()
        raise KdcliError(f"the ONNX export of {loaded.arch} does not reproduce the student's logits on {where} "
                         f"(max |Δlogit| {worst:.3g} > {ONNX_TOLERANCE * scale:.3g}); export fp16 or bf16 instead, "
                         "or report it with --debug output")


def write_exports(loaded: LoadedModel, config: DataConfig, source: DataSource | None, labels: list[str] | None,
                  formats: list[str], out: Path, seed: int, calibration_images: int = CALIBRATION_IMAGES) -> list[Path]:
    """Write each format into out (model.onnx, model.int8.onnx, fp16/, bf16/); returns the paths in that order."""
    out.mkdir(parents=True, exist_ok=True)
    model = loaded.model.eval()
    if next(model.parameters()).device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float().cpu()
    loaded = dataclasses.replace(loaded, model=model)
    params, macs = count_params(model), count_macs(model, config.image_size)
    paths: dict[str, Path] = {}
    fp32 = None
    if {"onnx", "int8"} & set(formats):
        fp32 = export_onnx(loaded, config, out / ONNX_NAME, params, macs)
        _check_onnx(loaded, fp32, *_check_images(source, config))
        paths["onnx"] = fp32.path
    if "int8" in formats:
        batches, sample = calibration_batches(source, config, calibration_images, seed)
        paths["int8"] = quantize_int8(fp32, out / INT8_NAME, batches, sample).path
        if "onnx" not in formats:  # only a step towards int8
            fp32.path.unlink()
    for fmt in HALF_DTYPES:
        if fmt in formats:
            paths[fmt] = save_half(loaded, config, labels, out / fmt, fmt)
    return [paths[fmt] for fmt in formats]


def own_config(loaded: LoadedModel, native_size: int | None) -> DataConfig:
    """A model's preprocessing as its checkpoint states it, else the data's native size and timm's defaults."""
    return own_preprocessing(None, loaded.stated, native_layer(native_size), loaded.arch).config


def exported_subjects(paths: list[Path], source_size: int | None) -> list[Subject]:
    """The written files read back as kdcli eval reads them."""
    subjects = []
    for path in paths:
        if path.suffix == ".onnx":
            subjects.append(onnx_subject(read_onnx(path)))
            continue
        half = load_checkpoint(str(path), None, "export", "--arch")
        half.model.to(HALF_DTYPES[path.name])
        made = model_subject(half, own_config(half, source_size), half.weights_path)
        made.details = {"dtype": str(HALF_DTYPES[path.name]).removeprefix("torch.")}
        subjects.append(made)
    return subjects


def quick_check(student: Subject, exports: list[Subject]) -> list[dict]:
    """Without data: each export's logits against the fp32 student's on seeded random inputs."""
    images, where = _check_images(None, student.config)
    expected = student.predictor(images)
    found = []
    for export in exports:
        logits = export.predictor(images)
        found.append({"format": export.format, "path": str(export.path), "runtime": export.predictor.runtime,
                      "checked_on": where, "max_abs_logit_diff": (logits - expected).abs().max().item(),
                      "agreement_fp32": agreement(logits, expected), "details": export.details})
    return found


def export_student(
    student_ref: str,
    formats_text: str,
    out: Path,
    *,
    data_spec: str | None = None,
    arch: str | None = None,
    teacher_ref: str | None = None,
    teacher_arch: str | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    seed: int = 0,
    threads: int | None = None,
    batch_size: int = 256,
    workers: int = 0,
    device_name: str = "auto",
    force: bool = False,
    min_top1: float | None = None,
    max_drop: float | None = None,
) -> dict:
    """`kdcli export`: write the formats into out and check them. With data: a report (kind export) in out, the
    gate applied to every file. Without: the logit check on random inputs, nothing but the files written."""
    started, out = time.perf_counter(), Path(out)
    formats = check_request(formats_text, data_spec is not None)
    check_gate_options(min_top1, max_drop, teacher_ref is not None)
    if data_spec is None and (min_top1 is not None or max_drop is not None or teacher_ref):
        raise KdcliError("--min-top1, --max-drop and --teacher measure accuracy on the validation split; pass --data")
    if calibration_images < 1:
        raise KdcliError(f"--calibration-images {calibration_images}: must be 1 or more")
    if threads is not None and threads < 1:
        raise KdcliError(f"--threads {threads}: must be 1 or more")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    inputs = {"student": student_ref, "teacher": teacher_ref}
    try:
        with Outputs(out, force=force, data=data_spec, inputs=inputs, phase="exporting") as outputs:
            device = resolve_device(device_name)
            source = open_data(data_spec) if data_spec else None
            loaded = load_checkpoint(student_ref, arch, "student", "--arch")
            if source is not None and loaded.num_classes != source.num_classes:
                raise KdcliError(f"the student has {loaded.num_classes} classes but the data has "
                                 f"{source.num_classes}; pass the data it was trained on")
            config = own_config(loaded, source.native_size if source else None)
            student = model_subject(loaded, config, loaded.weights_path)
            teacher = subject(teacher_ref, teacher_arch, "teacher", "--teacher-arch", source) if teacher_ref else None
            paths = write_exports(loaded, config, source, loaded.label_names, formats, outputs.folder, seed,
                                  calibration_images)
            exports = exported_subjects(paths, source.native_size if source else None)
            if source is None:
                checked = [{**e, "path": str(public(e["path"]))} for e in quick_check(student, exports)]
                return {"kind": "export", "student": str(loaded.weights_path), "exports": checked}
            evaluation = assess(source, device, batch_size, workers, student, teacher, None, exports)
            for entry in evaluation["exports"]:
                entry["path"] = str(public(entry["path"]))
            report = stamp({"kind": "export", "run": run_info(device, source, config, time.perf_counter() - started,
                                                              seed),
                            "recipe": None, "stages": [], **evaluation})
            report["gate"] = gate_result(report, min_top1, max_drop)
            report = write_report(outputs.folder, report)
    finally:
        torch.set_num_threads(previous)
    enforce(report)
    return report
