"""`kdcli convert`: the checkpoints people have into the timm-layout folder (model.safetensors + config.json).

Reads timm `train.py` checkpoints (`.pth.tar`: `state_dict`, `state_dict_ema`, `args` as an argparse.Namespace),
Lightning `.ckpt` (`state_dict` whose keys carry the LightningModule's attribute name: `--prefix model.`),
DataParallel/DDP and torch.compile prefixes, and plain state dicts. The file is read with
`torch.load(weights_only=True)`, which rebuilds only tensors and plain containers; the one extra global admitted
is `argparse.Namespace`, as timm admits it. Everything is checked before the folder appears, all at once.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

import timm
import torch

from kdcli.errors import KdcliError
from kdcli.models.checkpoint import (
    WEIGHTS_NAME, LoadedModel, check_arch, check_finite, classifier_key, count_params, create, load_strict,
    model_args_for, read_safetensors, save_timm_folder,
)
from kdcli.models.preprocessing import Layer, own_preprocessing

# Where training scripts keep the weights inside a checkpoint dict, in the order they are tried.
WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")
EMA_WRAPPERS = ("state_dict_ema", "model_ema")
SAFE_GLOBALS = (argparse.Namespace,)  # timm train.py keeps its arguments as a Namespace, as timm itself admits
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile, in either order (as timm)


def read_weights_only(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refusals, corrupt zips, truncated files: all mean "not loadable"
        raise KdcliError(
            f"{path} cannot be loaded safely with torch.load(weights_only=True) ({load_error_reason(err, path)}); "
            "re-save it as a plain state dict: torch.save(model.state_dict(), path)"
        ) from err


def load_error_reason(err: Exception, path: Path) -> str:
    """Why torch refused a file, in whole words: the globals it would have to import, else its first line."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint at all: the load error says why
        unsafe = []
    unsafe = [name for name in unsafe if name not in {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}]
    if unsafe:
        shown = ", ".join(unsafe[:4]) + (f" and {len(unsafe) - 4} more" if len(unsafe) > 4 else "")
        return f"Unsupported global: it holds objects that would run code to rebuild: {shown}"
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    refused = next((line.partition("error: ")[2] for line in lines if "WeightsUnpickler error:" in line), "")
    reason = refused or next((line for line in lines if line), type(err).__name__)
    return reason if len(reason) <= 200 else reason[:200].rsplit(" ", 1)[0] + " ..."


def unwrap_state_dict(content: object, path: Path, ema: bool, prefix: str | None) -> tuple[dict, str | None, str]:
    """(tensors by key, the wrapper key or None, where they were found) from a state dict or a script's wrapper."""
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
    where = f"'{found}'" if found else "the top level"
    if prefix:
        kept = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        if not kept:
            raise KdcliError(f"{path}: no key in {where} starts with --prefix '{prefix}' "
                             f"(they start with {', '.join(_prefixes(tensors)[:4])})")
        tensors, where = kept, f"{where} under '{prefix}'"
    for wrapper in (*WRAPPER_PREFIXES, *WRAPPER_PREFIXES):
        if all(key.startswith(wrapper) for key in tensors):
            tensors = {key.removeprefix(wrapper): value for key, value in tensors.items()}
    return tensors, found, where


def _prefixes(tensors: dict) -> list[str]:
    return sorted({key.split(".")[0] + "." for key in tensors})


def training_args(content: object) -> dict:
    """The arguments a timm train.py checkpoint was trained with (an argparse.Namespace under 'args')."""
    args = content.get("args") if isinstance(content, dict) else None
    return vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}


def args_layer(args: dict, model: torch.nn.Module) -> Layer | None:
    """The preprocessing a timm train.py run used, as timm resolves it from its arguments and the model."""
    stated = {k for k in ("img_size", "input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
              if args.get(k) not in (None, "")}
    if not stated:
        return None
    from timm.data import resolve_data_config

    config = resolve_data_config({k: args[k] for k in stated}, model=model)
    values = {"image_size": int(config["input_size"][-1]), "mean": tuple(config["mean"]), "std": tuple(config["std"]),
              "interpolation": config["interpolation"], "crop_pct": float(config["crop_pct"]),
              "crop_mode": config.get("crop_mode", "center")}
    named = {"img_size": "image_size", "input_size": "image_size"}
    return Layer("the checkpoint's train.py args", {k: v for k, v in values.items()
                                                    if k in {named.get(s, s) for s in stated}})


def _arch_of(arch: str | None, content: object, args: dict) -> tuple[str, str]:
    """(architecture, where it came from): the flag, else train.py's args.model, else the checkpoint's 'arch'."""
    if arch:
        return arch, "--arch"
    for name, where in ((args.get("model"), "args.model"),
                        (content.get("arch") if isinstance(content, dict) else None, "'arch'")):
        if isinstance(name, str) and timm.is_model(name.partition(".")[0]):
            return name.partition(".")[0], f"the checkpoint's {where}"
    raise KdcliError("the checkpoint does not name its timm architecture; pass --arch ARCH")


def convert_checkpoint(src: str, arch: str | None, out: Path, flags: Layer, ema: bool = False,
                       prefix: str | None = None) -> dict:
    """Load src strictly into its architecture and write out/model.safetensors + out/config.json at once."""
    path = Path(src)
    if not path.is_file():
        raise KdcliError(f"{src} does not exist or is not a file; pass the .pth/.pth.tar/.pt/.bin/.ckpt to convert")
    if arch:
        check_arch(arch, "--arch")
    if path.suffix == ".safetensors":
        content, found, where = None, None, "the top level"
        tensors = read_safetensors(path, "checkpoint")[0]
    else:
        content = read_weights_only(path)
        tensors, found, where = unwrap_state_dict(content, path, ema, prefix)
    args = training_args(content)
    arch, arch_from = _arch_of(arch, content, args)
    key = classifier_key(arch)
    if key not in tensors:
        hint = f" (its keys start with {', '.join(_prefixes(tensors)[:3])}: pass --prefix)" if not prefix else ""
        raise KdcliError(f"{src}: no classifier weight '{key}' at {where}{hint}, so it is not a {arch}; "
                         "pass the right --arch")
    check_finite(tensors, src)
    num_classes = int(tensors[key].shape[0])
    probe = create(arch, num_classes, {}, "--arch")
    resolved = own_preprocessing(flags, args_layer(args, probe), None, arch)
    model_args = model_args_for(arch, resolved.config.image_size)
    model = create(arch, num_classes, model_args, "--arch") if model_args else probe
    load_strict(model, tensors, src, arch, "--arch")
    loaded = LoadedModel(model, arch, num_classes, model_args=model_args)
    with staged_folder(out) as folder:
        save_timm_folder(folder, loaded, resolved.config, None, {"converted_from": path.name})
    other = [k for k in ("state_dict", *EMA_WRAPPERS) if k != found and isinstance((content or {}).get(k), dict)]
    return {
        "source": str(path), "weights": found, "prefix": prefix, "weights_at": where, "arch": arch,
        "arch_from": arch_from, "num_classes": num_classes,
        "params": count_params(model), "tensors": len(tensors), "out": str(out / WEIGHTS_NAME),
        "preprocessing": resolved.summary(), "also_in_file": other,
    }


class staged_folder:
    """A folder written under a temporary name beside `out` and renamed onto it only when complete, so `out`
    appears all at once or not at all (a forced run replaces the old folder only then)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        shutil.rmtree(old, ignore_errors=True)
