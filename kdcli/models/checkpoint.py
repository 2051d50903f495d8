"""safetensors <-> timm models. Reads and writes weights only: nothing here ever unpickles.

A checkpoint is a `.safetensors` file, or a timm-layout folder (`model.safetensors` + `config.json`).
Architecture: the caller's flag, else the file's metadata `arch`, else `config.json` `architecture`.
num_classes: from the classifier weight's shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

from kdcli import __version__
from kdcli.data import DataConfig
from kdcli.errors import KdcliError, close_matches
from kdcli.fsio import atomic_write, encodable, write_json

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")


@dataclass
class LoadedModel:
    """A timm model with what is known about it."""

    model: nn.Module
    arch: str
    num_classes: int
    data_config: DataConfig | None = None  # preprocessing recorded with the weights
    label_names: list[str] | None = None
    model_args: dict = field(default_factory=dict)  # extra create_model kwargs (e.g. img_size of a ViT)
    weights_path: Path | None = None  # None: freshly initialised

    @property
    def pretrained(self) -> bool:
        return self.weights_path is not None

    @property
    def file_bytes(self) -> int | None:
        return self.weights_path.stat().st_size if self.weights_path else None


def is_checkpoint_ref(ref: str) -> bool:
    """A path to weights (rather than an architecture name)."""
    path = Path(ref)
    return path.exists() or path.suffix in (".safetensors", *PICKLE_SUFFIXES) or "/" in ref or "\\" in ref


def check_arch(arch: str, flag: str) -> None:
    if not timm.is_model(arch):
        hint = close_matches(arch, timm.list_models(), n=4)
        raise KdcliError(f"unknown timm architecture '{arch}'{hint}; see timm.list_models() ({flag})")


def model_args_for(arch: str, image_size: int | None) -> dict:
    """create_model kwargs an architecture needs at this input size: fixed-size models (ViTs) get img_size."""
    default = get_pretrained_cfg(arch)
    if image_size and default is not None and default.fixed_input_size and default.input_size[-1] != image_size:
        return {"img_size": image_size}
    return {}


def create(arch: str, num_classes: int, model_args: dict, flag: str = "--student") -> nn.Module:
    check_arch(arch, flag)
    try:
        return timm.create_model(arch, num_classes=num_classes, **model_args)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        args = ", ".join(f"{k}={v}" for k, v in model_args.items())
        raise KdcliError(f"timm cannot build {arch} with {args or 'default arguments'}: {err}") from err


def fresh_model(arch: str, num_classes: int, image_size: int | None) -> LoadedModel:
    """A randomly initialised timm model (no download: pretrained is never requested)."""
    args = model_args_for(arch, image_size)
    return LoadedModel(create(arch, num_classes, args), arch, num_classes, model_args=args)


def _locate(ref: str, role: str) -> tuple[Path, dict | None]:
    """(weights file, config.json contents or None) of a checkpoint reference."""
    path = Path(ref)
    if not path.exists():
        if timm.is_model(ref):
            raise KdcliError(
                f"{role} {ref} is an architecture name, but the {role} needs trained weights; train them with "
                f"'kdcli train {ref} --data DIR --out {role}/' and pass {role}/"
            )
        raise KdcliError(f"{role} {ref} does not exist; pass a .safetensors file or a folder with {WEIGHTS_NAME}")
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = f"; convert {pickles[0]} with 'kdcli convert'" if pickles else ""
            hint = hint or "; pass a folder that kdcli train/distill/convert wrote, or the .safetensors file itself"
            raise KdcliError(f"{role} folder {ref} has no {WEIGHTS_NAME}{hint}")
    else:
        weights = path
        if path.suffix in PICKLE_SUFFIXES:
            raise KdcliError(
                f"{role} {ref} is a pickle checkpoint, which kdcli never loads; convert it first: "
                f"kdcli convert {ref} --arch ARCH --out {path.with_suffix('')}"
            )
        if path.suffix != ".safetensors":
            raise KdcliError(f"{role} {ref} is not a .safetensors file or a checkpoint folder")
    config_path = weights.parent / CONFIG_NAME
    config = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise KdcliError(f"{config_path} is not valid JSON ({err}); fix or delete it") from err
        if not isinstance(config, dict):
            raise KdcliError(f"{config_path} must hold a JSON object (timm layout)")
    return weights, config


def read_safetensors(path: Path, role: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return safetensors.torch.load_file(str(path)), metadata
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise KdcliError(
            f"{role} {path} is not a readable safetensors file ({str(err).splitlines()[0]}); re-export or re-copy it"
        ) from err


def classifier_key(arch: str) -> str:
    cfg = get_pretrained_cfg(arch)
    classifier = cfg.classifier if cfg is not None else None
    if isinstance(classifier, (tuple, list)):
        classifier = classifier[0]
    return f"{classifier or 'head'}.weight"


def load_checkpoint(ref: str, arch_flag: str | None, role: str, flag: str) -> LoadedModel:
    """Load a `.safetensors` file or timm-layout folder into its timm architecture, strictly."""
    weights, config = _locate(ref, role)
    tensors, metadata = read_safetensors(weights, role)
    config = config or {}
    arch = arch_flag or metadata.get("arch") or config.get("architecture")
    if not arch:
        raise KdcliError(
            f"{role} {ref}: cannot tell its architecture (no 'arch' in the file's metadata, no config.json); "
            f"pass {flag} ARCH"
        )
    check_arch(arch, flag)
    key = classifier_key(arch)
    if key not in tensors:
        raise KdcliError(
            f"{role} {ref}: no classifier weight '{key}' in the file, so it is not a {arch}; pass the right {flag}"
        )
    num_classes = int(tensors[key].shape[0])
    pretrained_cfg = config.get("pretrained_cfg") or json.loads(metadata.get("data_config", "null") or "null")
    model_args = config.get("model_args") or json.loads(metadata.get("model_args", "{}"))
    model = create(arch, num_classes, model_args, flag)
    load_strict(model, tensors, f"{role} {ref}", arch, flag)
    data_config = None
    if pretrained_cfg and pretrained_cfg.get("input_size") and pretrained_cfg.get("mean"):
        data_config = DataConfig.from_pretrained_cfg(pretrained_cfg)
    labels = config.get("label_names")
    return LoadedModel(model, arch, num_classes, data_config, list(labels) if labels else None, model_args, weights)


def load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], what: str, arch: str, flag: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in own]
    shapes = [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if shapes:
            k = shapes[0]
            parts.append(f"{k} is {list(tensors[k].shape)} in the file but {list(own[k].shape)} in {arch}")
        raise KdcliError(f"{what} does not fit {arch}: {'; '.join(parts)}; pass the right {flag}")
    model.load_state_dict(tensors, strict=False)


def save_timm_folder(
    folder: Path,
    loaded: LoadedModel,
    data_config: DataConfig,
    label_names: list[str] | None,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write model.safetensors + config.json so that timm loads them with no kdcli code."""
    folder.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": "pt",
        "arch": loaded.arch,
        "num_classes": str(loaded.num_classes),
        "kdcli_version": __version__,
        "data_config": json.dumps(data_config.pretrained_cfg()),
        "model_args": json.dumps(loaded.model_args),
        **{key: encodable(value) for key, value in (extra_metadata or {}).items()},  # a file name may not be UTF-8
    }
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))
    pretrained_cfg = {
        **data_config.pretrained_cfg(),
        "num_classes": loaded.num_classes,
        "first_conv": model.pretrained_cfg.get("first_conv"),
        "classifier": model.pretrained_cfg.get("classifier"),
        "fixed_input_size": bool(model.pretrained_cfg.get("fixed_input_size", False)),
    }
    config = {
        "architecture": loaded.arch,
        "num_classes": loaded.num_classes,
        "num_features": int(getattr(model, "num_features", 0)),
        **({"label_names": list(label_names)} if label_names else {}),
        **({"model_args": loaded.model_args} if loaded.model_args else {}),
        "pretrained_cfg": pretrained_cfg,
    }
    write_json(folder / CONFIG_NAME, config)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
