"""What every command needs before it works: a device, an output folder it may write, models to assess."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from kdcli.data import DataSource
from kdcli.errors import KdcliError
from kdcli.evaluation.assess import Subject, model_subject, onnx_subject
from kdcli.models.checkpoint import LoadedModel, load_checkpoint
from kdcli.models.export import Exported, read_onnx, require_extra, stored_float_dtype
from kdcli.models.preprocessing import own_config
from kdcli.training.trainstate import CHECKPOINT_NAME


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KdcliError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise KdcliError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def check_out(out: Path, force: bool) -> None:
    """Refuse an output folder that is a file, non-empty (unless forced) or not writable; create nothing."""
    if out.exists() and not out.is_dir():
        raise KdcliError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        hint = "--resume to continue its run, " if (out / CHECKPOINT_NAME).is_file() else ""
        raise KdcliError(f"--out {out} is not empty; pass {hint}--force to overwrite it, or choose a new folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    try:  # permission bits do not tell (root, read-only mounts): try it
        os.rmdir(tempfile.mkdtemp(prefix=".kdcli-", dir=existing))
    except OSError as err:
        raise KdcliError(f"--out {out}: cannot write in {existing} ({err.strerror}); choose another folder") from err


def subject(ref: str, arch: str | None, role: str, flag: str, source: DataSource) -> Subject:
    """A model to evaluate with its own preprocessing: a checkpoint (preprocessing from its config.json, else its
    architecture's defaults) run by torch in the dtype it was stored in (fp32, fp16, bf16), or an ONNX file that
    kdcli exported (its metadata says it all), run by onnxruntime."""
    if Path(ref).suffix.lower() == ".onnx":
        exported = open_onnx(Path(ref), role)
        made, num_classes = onnx_subject(exported), exported.num_classes
    else:
        loaded = load_checkpoint(ref, arch, role, flag)
        loaded.model.to(stored_float_dtype(loaded.weights_path) or torch.float32)
        made, num_classes = model_subject(loaded, own_config(loaded, source.native_size), loaded.weights_path), \
            loaded.num_classes
    if num_classes != source.num_classes:
        raise KdcliError(
            f"the {role} has {num_classes} classes but the data has {source.num_classes}; "
            "evaluate it on the data it was trained for"
        )
    return made


def open_onnx(path: Path, role: str) -> Exported:
    if not path.is_file():
        raise KdcliError(f"{role} {path} does not exist; pass an .onnx file that kdcli export wrote")
    require_extra(f"evaluating {path.name}")
    return read_onnx(path)


def probe(loaded: LoadedModel, size: int, role: str, device: torch.device) -> None:
    """One forward pass at the input size, so a size the architecture cannot take fails before training."""
    was_training = loaded.model.training
    try:
        with torch.no_grad():
            loaded.model.eval()(torch.zeros(2, 3, size, size, device=device))
    except (RuntimeError, ValueError, AssertionError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KdcliError(
            f"the {role} {loaded.arch} cannot take {size}x{size} images ({reason}); set a larger data.image_size"
        ) from err
    finally:
        loaded.model.train(was_training)
