"""`kdcli convert`: a PyTorch/timm training checkpoint (.pth, .pt, .bin, .ckpt) into the timm-layout folder.

The file is read with `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers and
refuses anything that would run code. Everything is checked before the folder is written.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kdcli.models.checkpoint import (
    WEIGHTS_NAME, LoadedModel, check_arch, classifier_key, count_params, create, load_strict, model_args_for,
    read_safetensors, save_timm_folder,
)
from kdcli.data import DataConfig
from kdcli.errors import KdcliError
from kdcli.models.preprocessing import arch_default_config

# Where training scripts keep the weights inside a checkpoint dict, in the order they are tried.
WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")
EMA_WRAPPERS = ("state_dict_ema", "model_ema")


def read_weights_only(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refusals, corrupt zips, truncated files: all mean "not loadable"
        reason = _reason(err)
        raise KdcliError(
            f"{path} cannot be loaded safely with torch.load(weights_only=True) ({reason[:160]}); "
            "re-save it as a plain state dict: torch.save(model.state_dict(), path)"
        ) from err


def _reason(err: Exception) -> str:
    """The informative line of torch's (long, coloured) load error, e.g. which global it refused."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    refused = next((line.partition("error: ")[2] for line in lines if "WeightsUnpickler error:" in line), "")
    return refused or next((line for line in lines if line), type(err).__name__)


def unwrap_state_dict(content: object, path: Path, ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors by key, where they were found) from a plain state dict or a common training-script wrapper."""
    if not isinstance(content, dict):
        raise KdcliError(f"{path} holds a {type(content).__name__}, not a state dict; save model.state_dict()")
    order = (*EMA_WRAPPERS, *WRAPPERS) if ema else WRAPPERS
    found = next((key for key in order if isinstance(content.get(key), dict)), None)
    if ema and found not in EMA_WRAPPERS:
        raise KdcliError(f"{path} has no EMA weights (no {' or '.join(EMA_WRAPPERS)} entry); drop --ema")
    weights = content[found] if found else content
    tensors = {key: value for key, value in weights.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        keys = ", ".join(list(map(str, content))[:6])
        raise KdcliError(f"{path} holds no tensors (top-level keys: {keys}); save model.state_dict()")
    if all(key.startswith("module.") for key in tensors):  # saved from DataParallel / DDP
        tensors = {key.removeprefix("module."): value for key, value in tensors.items()}
    return tensors, f"'{found}'" if found else "the top level"


def convert_checkpoint(src: str, arch: str, out: Path, image_size: int | None, ema: bool) -> dict:
    """Load src strictly into arch and write out/model.safetensors + out/config.json; returns a summary."""
    path = Path(src)
    if not path.is_file():
        raise KdcliError(f"{src} does not exist or is not a file; pass the .pth/.pt/.bin/.ckpt to convert")
    check_arch(arch, "--arch")
    if path.suffix == ".safetensors":
        tensors, where = read_safetensors(path, "checkpoint")[0], "the top level"
    else:
        tensors, where = unwrap_state_dict(read_weights_only(path), path, ema)
    key = classifier_key(arch)
    if key not in tensors:
        raise KdcliError(f"{src}: no classifier weight '{key}' at {where}, so it is not a {arch}; pass the right --arch")
    num_classes = int(tensors[key].shape[0])
    model_args = model_args_for(arch, image_size)
    model = create(arch, num_classes, model_args, "--arch")
    load_strict(model, tensors, src, arch, "--arch")
    base = arch_default_config(arch, None)
    config = DataConfig(image_size or base.image_size, base.mean, base.std, base.interpolation,
                        1.0 if image_size else base.crop_pct, base.crop_mode)
    loaded = LoadedModel(model, arch, num_classes, config, None, model_args)
    save_timm_folder(out, loaded, config, None, {"converted_from": path.name})
    return {
        "source": str(path), "weights": where, "arch": arch, "num_classes": num_classes,
        "params": count_params(model), "tensors": len(tensors), "out": str(out / WEIGHTS_NAME),
        "input_size": config.pretrained_cfg()["input_size"],
    }
