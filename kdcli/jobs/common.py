"""What every command needs before it works: a device, models to assess, a check of the input size."""

from __future__ import annotations

import torch

from kdcli.data import DataSource
from kdcli.errors import KdcliError, is_out_of_memory
from kdcli.evaluation.assess import Subject
from kdcli.models.checkpoint import LoadedModel, load_checkpoint
from kdcli.models.modes import evaluating
from kdcli.models.preprocessing import Layer, native_layer, own_preprocessing


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KdcliError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise KdcliError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def subject(ref: str, arch: str | None, role: str, flag: str, source: DataSource,
            flags: Layer | None = None) -> Subject:
    """A model to evaluate with its own preprocessing: flags, else its config.json, else the data's native size
    and its architecture's defaults."""
    loaded = load_checkpoint(ref, arch, role, flag)
    if loaded.num_classes != source.num_classes:
        raise KdcliError(
            f"the {role} has {loaded.num_classes} classes but the data has {source.num_classes}; "
            "evaluate it on the data it was trained for"
        )
    resolved = own_preprocessing(flags, loaded.stated, native_layer(source.native_size), loaded.arch)
    return Subject(loaded, resolved.config, loaded.weights_path)


def probe(loaded: LoadedModel, size: int, role: str, device: torch.device) -> None:
    """One forward pass at the input size, so a size the architecture cannot take fails before training."""
    try:
        with torch.no_grad(), evaluating(loaded.model):
            loaded.model(torch.zeros(2, 3, size, size, device=device))
    except (RuntimeError, ValueError, AssertionError, MemoryError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if is_out_of_memory(err):
            raise KdcliError(f"the {role} {loaded.arch} at {size}x{size} needs more memory than this machine has "
                             f"({reason}); set a smaller data.image_size") from err
        raise KdcliError(
            f"the {role} {loaded.arch} cannot take {size}x{size} images ({reason}); set a larger data.image_size"
        ) from err
