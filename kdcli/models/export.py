"""Deployable files from a student: ONNX (fp32), int8 ONNX (static post-training quantisation) and half-precision
safetensors folders that timm loads; and what an exported file says about itself.

ONNX files carry kdcli's facts about the model in their metadata_props (arch, classes, preprocessing, parameters,
MACs), so `kdcli eval model.int8.onnx` needs nothing beside the file. onnx, onnxruntime and onnxscript are the
optional extra `kdcli[export]`; they are imported only here and in the ONNX predictor, through require_extra().
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import shutil
import warnings
from collections.abc import Iterable, Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import torch

from kdcli import __version__
from kdcli.data import DataConfig
from kdcli.errors import KdcliError, close_matches
from kdcli.fsio import atomic_write
from kdcli.models.checkpoint import LoadedModel, save_timm_folder

FORMATS = ("onnx", "int8", "fp16", "bf16")
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_NAME, INT8_NAME = "model.onnx", "model.int8.onnx"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
EXTRA = 'pip install "kdcli[export]"'
# int8: ONNX Runtime static quantisation, chosen by measurement (README, "Export and int8"; benchmarks/int8_toolchains.py)
INT8_SETTINGS = {"toolchain": "onnxruntime", "format": "QDQ", "activations": "uint8", "weights": "int8",
                 "per_channel": True, "calibration": "minmax"}


def parse_formats(text: str, flag: str = "--format") -> list[str]:
    """'onnx,int8' -> ['onnx', 'int8'] in the order given, each once; an unknown name is a usage error."""
    formats = []
    for name in (part.strip().lower() for part in text.split(",")):
        if name not in FORMATS:
            hint = close_matches(name, FORMATS)
            raise KdcliError(f"{flag} {text}: unknown export format '{name}'{hint}; choose from {', '.join(FORMATS)} "
                             "(several: onnx,int8)")
        if name not in formats:
            formats.append(name)
    return formats


def require_extra(purpose: str) -> None:
    """Import what ONNX export and inference need, or fail with one line naming the extra to install."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise KdcliError(f"{purpose} needs {module}, which is not installed ({err}); {EXTRA}") from err


@dataclass
class Exported:
    """What an exported file says about itself (kdcli metadata), enough to evaluate it with no other file."""

    path: Path
    format: str  # onnx, int8, fp16, bf16
    arch: str
    num_classes: int
    data_config: DataConfig
    params: int
    macs: int | None
    details: dict  # opset, quantisation settings, calibration sample


def _metadata(loaded: LoadedModel, config: DataConfig, fmt: str, params: int, macs: int, details: dict) -> dict:
    return {
        "kdcli_version": __version__, "format": fmt, "arch": loaded.arch, "num_classes": str(loaded.num_classes),
        "data_config": json.dumps(config.pretrained_cfg()), "model_args": json.dumps(loaded.model_args),
        "params": str(params), "macs": str(macs), "details": json.dumps(details),
    }


def _save_onnx(model_proto, path: Path, metadata: dict[str, str]) -> None:
    import onnx

    del model_proto.metadata_props[:]
    for key, value in metadata.items():
        model_proto.metadata_props.add(key=key, value=value)
    atomic_write(path, lambda tmp: onnx.save_model(model_proto, str(tmp)))


def export_onnx(loaded: LoadedModel, config: DataConfig, path: Path, params: int, macs: int) -> Exported:
    """fp32 ONNX through torch.onnx.export (dynamo), batch dimension dynamic, kdcli metadata recorded.
    The model must be on the CPU in float32."""
    import onnx

    model = loaded.model.eval()
    example = torch.zeros(2, 3, config.image_size, config.image_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):  # the exporter prints its progress
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
    proto = onnx.load_from_string(program.model_proto.SerializeToString())
    opset = next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    details = {"opset": opset, "dynamic_batch": True, "exporter": f"torch.onnx (dynamo) {torch.__version__}"}
    _save_onnx(proto, path, _metadata(loaded, config, "onnx", params, macs, details))
    return read_onnx(path)


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over batches of preprocessed training images."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self._batches: Iterator[torch.Tensor] = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch.numpy().astype(np.float32)}


def quantize_int8(fp32: Exported, path: Path, calibration: Iterable[torch.Tensor], sample: dict) -> Exported:
    """Static post-training quantisation of the fp32 ONNX file with onnxruntime (settings: INT8_SETTINGS),
    calibrated on the given batches of preprocessed training images; metadata carried over."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    tmp_dir = path.parent / f".{path.name}.work"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        prepared, quantized = tmp_dir / "prepared.onnx", tmp_dir / "quantized.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32.path), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(quantized), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=INT8_SETTINGS["per_channel"], activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        proto = onnx.load(str(quantized))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    details = {**fp32.details, "quantization": {**INT8_SETTINGS, "calibration_sample": sample}}
    metadata = {entry.key: entry.value for entry in onnx.load(str(fp32.path)).metadata_props}
    _save_onnx(proto, path, {**metadata, "format": "int8", "details": json.dumps(details)})
    return read_onnx(path)


def save_half(loaded: LoadedModel, config: DataConfig, labels: list[str] | None, folder: Path, fmt: str) -> Path:
    """A timm-layout folder (model.safetensors + config.json) with floating tensors in fp16 or bf16."""
    dtype = HALF_DTYPES[fmt]
    # .to(dtype) casts floating parameters and buffers only: batch-norm counters stay integers
    half = LoadedModel(copy.deepcopy(loaded.model).cpu().to(dtype), loaded.arch, loaded.num_classes,
                       model_args=loaded.model_args)
    save_timm_folder(folder, half, config, labels, {"dtype": str(dtype).removeprefix("torch.")})
    return folder


def stored_float_dtype(path: Path) -> torch.dtype | None:
    """The floating dtype of a safetensors file's tensors (read from its header), if they share one."""
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    with safetensors.safe_open(str(path), framework="pt") as handle:
        found = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    floating = {names[d] for d in found if d in names}
    return floating.pop() if len(floating) == 1 else None


def read_onnx(path: Path) -> Exported:
    """The kdcli metadata of an ONNX file; a file without it (not written by kdcli export) is refused."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError, OSError, ValueError...: whatever it is, the file is unreadable
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KdcliError(f"{path} is not a readable ONNX file ({reason}); re-export or re-copy it") from err
    meta = {entry.key: entry.value for entry in proto.metadata_props}
    if "arch" not in meta or "data_config" not in meta:
        raise KdcliError(f"{path} has no kdcli metadata (architecture, preprocessing); export it with "
                         "'kdcli export STUDENT_FOLDER --format onnx' to evaluate it here")
    try:
        return Exported(path, meta.get("format", "onnx"), meta["arch"], int(meta["num_classes"]),
                        DataConfig.from_pretrained_cfg(json.loads(meta["data_config"])), int(meta["params"]),
                        int(meta["macs"]) if meta.get("macs") else None, json.loads(meta.get("details", "{}")))
    except (KeyError, ValueError, TypeError) as err:
        raise KdcliError(f"{path}: its kdcli metadata is damaged ({err}); export it again") from err
