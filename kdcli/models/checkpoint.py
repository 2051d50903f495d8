"""Checkpoints <-> timm models, through timm's own config parsing and factory.

A checkpoint is a `.safetensors` file, a timm-layout folder (`config.json` + `model.safetensors`, or whatever
weights file `timm.create_model("local-dir:…", pretrained=True)` finds there), a Hub repo (`hf-hub:ORG/NAME`,
`timm/ARCH.TAG`) or a timm pretrained tag (`ARCH.TAG`). Pickle-format weights are only ever read with
`torch.load(weights_only=True)`, as timm reads them. Loading is strict: a key or shape mismatch names the first
differing keys, and non-finite weights are refused.
Architecture: the caller's flag, else the file's metadata `arch`, else `config.json` `architecture` (the two
disagreeing is refused: which one is right cannot be told).
num_classes: from the classifier weight's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import timm
import torch
from timm.models import get_model_input_config, get_pretrained_cfg
from torch import nn

from kdcli import __version__
from kdcli.data import DataConfig
from kdcli.errors import KdcliError
from kdcli.fsio import atomic_write, encodable, write_json
from kdcli.models import hub
from kdcli.models.config import ModelConfig, read_config_json, read_metadata, registry_config
from kdcli.models.hub import check_arch
from kdcli.models.preprocessing import Layer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")
TRAINING_STATE_KEY = "kdcli_state"  # metadata key of kdcli's own training checkpoint (training/trainstate.py)


@dataclass
class LoadedModel:
    """A timm model with what is known about it."""

    model: nn.Module
    arch: str
    num_classes: int
    stated: Layer | None = None  # the preprocessing its checkpoint states, and where
    label_names: list[str] | None = None
    model_args: dict = field(default_factory=dict)  # extra create_model kwargs (e.g. img_size of a ViT)
    weights_path: Path | None = None  # None: freshly initialised
    init: str = "random"  # where its weights came from, for the plan and the report
    notes: list[str] = field(default_factory=list)

    @property
    def pretrained(self) -> bool:
        return self.weights_path is not None

    @property
    def file_bytes(self) -> int | None:
        return self.weights_path.stat().st_size if self.weights_path else None


@dataclass
class Source:
    """A checkpoint opened and read, before any model is built from it."""

    ref: str
    role: str
    flag: str
    kind: str  # "path", "hub" or "pretrained"
    name: str  # what timm.create_model is given: the architecture, or ARCH.TAG
    config: ModelConfig
    weights: Path
    tensors: dict[str, torch.Tensor]
    num_classes: int

    @property
    def arch(self) -> str:
        return self.name.partition(".")[0]

    @property
    def named(self) -> bool:
        """A Hub or pretrained name (where a new head for other classes is expected), not a local file."""
        return self.kind != "path"


def is_checkpoint_ref(ref: str) -> bool:
    """Weights to load (a path, a Hub repo or a pretrained tag) rather than an architecture to initialise."""
    return hub.parse_reference(ref).kind != "arch"


def model_args_for(arch: str, image_size: int | None) -> dict:
    """create_model kwargs an architecture needs at this input size: fixed-size models (ViTs) get img_size."""
    default = get_pretrained_cfg(arch)
    if image_size and default is not None and default.fixed_input_size and default.input_size[-1] != image_size:
        return {"img_size": image_size}
    return {}


def create(name: str, num_classes: int, model_args: dict, flag: str = "--student", what: str = "",
           **timm_kwargs) -> nn.Module:
    """timm.create_model; whatever timm raises on these arguments is one line naming them (and `what` they
    came from)."""
    check_arch(name, flag)
    try:
        return timm.create_model(name, **{**model_args, "num_classes": num_classes}, **timm_kwargs)
    except Exception as err:  # model_args come from files: any failure to build means they do not fit
        args = ", ".join(f"{k}={v}" for k, v in model_args.items())
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f"{what}: " if what else ""
        raise KdcliError(f"{where}timm cannot build {name} with {args or 'default arguments'}: {reason}; "
                         "fix its model_args or pass the right architecture") from err


def fresh_model(arch: str, num_classes: int, image_size: int | None) -> LoadedModel:
    """A randomly initialised timm model (no download: pretrained is never requested)."""
    args = model_args_for(arch, image_size)
    return LoadedModel(create(arch, num_classes, args), arch, num_classes, model_args=args)


def open_source(ref: str, arch_flag: str | None, role: str, flag: str) -> Source:
    """Find, fetch (Hub and pretrained names) and read a checkpoint: its config and its tensors."""
    reference = hub.parse_reference(ref)
    if reference.kind == "arch":
        check_arch(ref, flag)
        raise KdcliError(
            f"{role} {ref} is an architecture name, but the {role} needs trained weights; train them with "
            f"'kdcli train {ref} --data DIR --out {role}/' and pass {role}/, or name pretrained weights "
            f"({ref}.TAG or hf-hub:ORG/NAME)"
        )
    if reference.kind == "pretrained":
        cfg = hub.pretrained_cfg_of(ref, flag)
        weights = hub.fetch_pretrained_weights(ref, cfg, role)
        config, name = registry_config(ref, cfg), ref
    else:
        folder = hub.fetch_repo(reference.name, role) if reference.kind == "hub" else None
        weights, config_path = _locate(folder or Path(ref), role)
        config = read_config_json(config_path) if config_path else None
        name = None
    tensors, metadata = read_weights(weights, role)
    if config is None:
        config = read_metadata(metadata, weights)
    recorded = metadata.get("arch") if not reference.kind == "pretrained" else None
    if not arch_flag and recorded and config.arch and recorded.split(".")[0] != config.arch.split(".")[0]:
        raise KdcliError(f"{role} {ref}: its weights' metadata says architecture '{recorded}' but its config.json "
                         f"says '{config.arch}'; pass {flag} with the right one")
    arch = arch_flag or recorded or config.arch
    if not arch:
        raise KdcliError(
            f"{role} {ref}: cannot tell its architecture (no 'arch' in the file's metadata, no config.json); "
            f"pass {flag} ARCH"
        )
    check_arch(arch, flag)
    if arch_flag or not name:
        name = arch
    num_classes = _classifier_classes(tensors, arch, config, f"{role} {ref}", flag)
    return Source(ref, role, flag, reference.kind, name, config, weights, tensors, num_classes)


def _locate(path: Path, role: str) -> tuple[Path, Path | None]:
    """(weights file, config.json beside it or None) of a local checkpoint."""
    if not path.exists():
        hint = f"; if it is a Hub repo, write hf-hub:{path.as_posix()}" if path.as_posix().count("/") == 1 else ""
        raise KdcliError(f"{role} {path} does not exist; pass a .safetensors file or a folder with {WEIGHTS_NAME}{hint}")
    if path.is_dir():
        config = path / CONFIG_NAME if (path / CONFIG_NAME).is_file() else None
        weights = next((path / n for n in hub.HUB_WEIGHTS if (path / n).is_file()), None)
        if weights is None or (weights.suffix != ".safetensors" and config is None):
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = f"; convert {pickles[0]} with 'kdcli convert'" if pickles else ""
            hint = hint or "; pass a folder that kdcli train/distill/convert or timm's save_for_hf wrote"
            raise KdcliError(f"{role} folder {path} has no {WEIGHTS_NAME}{hint}")
        return weights, config
    if path.suffix in PICKLE_SUFFIXES:
        raise KdcliError(
            f"{role} {path} is a pickle checkpoint, which kdcli reads only through 'kdcli convert'; convert it "
            f"first: kdcli convert {path} --arch ARCH --out {path.with_suffix('')}"
        )
    if path.suffix != ".safetensors":
        raise KdcliError(f"{role} {path} is not a .safetensors file or a checkpoint folder")
    config = path.parent / CONFIG_NAME
    return path, config if config.is_file() else None


def read_weights(path: Path, role: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a weights file; kdcli's own training checkpoint is refused by name."""
    if path.suffix != ".safetensors":  # pytorch_model.bin of a timm/Hub folder: read as timm reads it
        return _read_pickle_weights(path, role), {}
    tensors, metadata = read_safetensors(path, role)
    if TRAINING_STATE_KEY in metadata:
        raise KdcliError(
            f"{role} {path} is kdcli's training checkpoint of an interrupted run (optimizer and training state, "
            f"not a model); continue that run with its command and --out {path.parent} --resume, or pass a "
            "finished run's student/ folder (distill) or output folder (train)"
        )
    return tensors, metadata


def _read_pickle_weights(path: Path, role: str) -> dict[str, torch.Tensor]:
    from timm.models import load_state_dict

    try:
        return load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as err:  # refused globals, corrupt zips, truncated files: all mean "not loadable"
        from kdcli.models.convert import load_error_reason

        raise KdcliError(f"{role} {path} cannot be read with torch.load(weights_only=True) "
                         f"({load_error_reason(err, path)}); re-save it as model.safetensors") from err


def read_safetensors(path: Path, role: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return safetensors.torch.load_file(str(path)), metadata
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise KdcliError(
            f"{role} {path} is not a readable safetensors file ({str(err).splitlines()[0]}); re-export or re-copy it"
        ) from err


def classifier_keys(arch: str, config: ModelConfig | None = None) -> tuple[str, ...]:
    """The classifier module names of an architecture (distilled ViTs have two)."""
    cfg = (config.pretrained_cfg if config and config.pretrained_cfg else None) or {}
    classifier = cfg.get("classifier")
    if classifier is None:
        default = get_pretrained_cfg(arch)
        classifier = default.classifier if default is not None else None
    classifier = classifier or "head"
    return tuple(classifier) if isinstance(classifier, (tuple, list)) else (classifier,)


def classifier_key(arch: str) -> str:
    return f"{classifier_keys(arch)[0]}.weight"


def _classifier_classes(tensors: dict, arch: str, config: ModelConfig, what: str, flag: str) -> int:
    key = f"{classifier_keys(arch, config)[0]}.weight"
    if key not in tensors:
        raise KdcliError(f"{what}: no classifier weight '{key}' in the file, so it is not a {arch}; pass the right {flag}")
    return int(tensors[key].shape[0])


def build(source: Source, num_classes: int | None = None, image_size: int | None = None,
          new_head: bool = False) -> LoadedModel:
    """The model of a source. As it is: loaded strictly. With a new head (other classes, or asked) or a fixed-size
    model at another size: through timm.create_model(..., pretrained=True, num_classes=N), which keeps the backbone,
    initialises a new head and adapts position embeddings, after the strict load has checked the file fits."""
    check_finite(source.tensors, f"{source.role} {source.ref}")
    same = _build_as_is(source)
    target = num_classes or source.num_classes
    new_head = new_head or target != source.num_classes
    current = get_model_input_config(same.model)
    resize = {}
    if image_size and current["fixed_input_size"] and current["input_size"][-1] != image_size:
        resize = {"img_size": image_size}
    if not new_head and not resize:
        return same
    declared = 0 if new_head and target == source.num_classes else source.num_classes  # timm drops a head that differs
    model = create(source.name, target, {**source.config.model_args, **resize}, source.flag,
                   pretrained=True, pretrained_cfg=source.config.pretrained_cfg,
                   pretrained_cfg_overlay={"source": "file", "file": str(source.weights), "num_classes": declared},
                   pretrained_model_args=dict(source.config.model_args))
    init = same.init + (f", head reset to {target} classes" if new_head else "")
    init += f", resized to {image_size}x{image_size}" if resize else ""
    model_args = {k: v for k, v in {**source.config.model_args, **resize}.items() if k != "num_classes"}
    return LoadedModel(model, source.arch, target, source.config.preprocessing, None if new_head else same.label_names,
                       model_args, source.weights, init, list(source.config.notes))


def _build_as_is(source: Source) -> LoadedModel:
    config = source.config
    model = create(source.name, source.num_classes, config.model_args, source.flag, f"{source.role} {source.ref}",
                   pretrained_cfg=config.pretrained_cfg)
    in_chans = get_model_input_config(model)["input_size"][0]
    if in_chans != 3:
        raise KdcliError(f"{source.role} {source.ref} takes {in_chans}-channel images; kdcli feeds RGB images")
    load_strict(model, source.tensors, f"{source.role} {source.ref}", source.arch, source.flag)
    init = f"pretrained {source.ref}" if source.named else str(source.weights)
    model_args = {k: v for k, v in config.model_args.items() if k != "num_classes"}  # the weights say it
    return LoadedModel(model, source.arch, source.num_classes, config.preprocessing, config.label_names,
                       model_args, source.weights, init, list(config.notes))


def load_checkpoint(ref: str, arch_flag: str | None, role: str, flag: str) -> LoadedModel:
    """A checkpoint's model exactly as saved, loaded strictly."""
    return build(open_source(ref, arch_flag, role, flag))


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise KdcliError(f"{what}: weight '{key}' holds NaN or infinite values (the training that wrote it "
                             "diverged, or the file is damaged); pass an earlier or re-exported checkpoint")


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
    import json

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
