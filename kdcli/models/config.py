"""What a checkpoint says about itself: its config.json (read by timm's own parser) or the safetensors metadata
kdcli writes, every field checked first so that a malformed one is one line naming the file and the field."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from timm.models import PretrainedCfg
from timm.models._hub import _parse_model_cfg

from kdcli.errors import KdcliError
from kdcli.models.preprocessing import Layer

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
# create_model() arguments that say where weights come from, not what the model is: kdcli loads the weights
# beside the config and never lets a config make it download.
WEIGHT_SOURCE_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
_PRETRAINED_FIELDS = {f.name for f in dataclasses.fields(PretrainedCfg)}


@dataclass
class ModelConfig:
    """A checkpoint's own description: architecture, create_model arguments, labels, preprocessing."""

    arch: str | None
    pretrained_cfg: dict | None  # as timm parsed it, for create_model(pretrained_cfg=...); None: the registry's
    model_args: dict = field(default_factory=dict)
    num_classes: int | None = None
    label_names: list[str] | None = None
    preprocessing: Layer = field(default_factory=lambda: Layer("", {}))
    notes: list[str] = field(default_factory=list)


def read_config_json(path: Path) -> ModelConfig:
    """config.json of a timm folder (new layout or legacy single dict), with timm's meaning."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KdcliError(f"{path} is not valid JSON ({err}); fix or delete it") from err
    except OSError as err:
        raise KdcliError(f"cannot read {path} ({err.strerror}); check its permissions") from err
    bad = _Checker(str(path))
    if not isinstance(raw, dict):
        raise KdcliError(f"{path} must hold a JSON object (timm layout), not {type(raw).__name__}")
    bad.text(raw, "architecture", required=True)
    legacy = "pretrained_cfg" not in raw
    cfg_path = "" if legacy else "pretrained_cfg."
    pretrained = raw if legacy else bad.mapping(raw, "pretrained_cfg")
    bad.mapping(raw, "model_args")
    bad.count(raw, "num_classes")
    for where, holder in (("", raw), (cfg_path, pretrained)):
        bad.labels(holder, "label_names", where)
        bad.labels(holder, "labels", where)
    _check_preprocessing(bad, pretrained, cfg_path)
    notes = []
    unknown = sorted(k for k in pretrained if k not in _PRETRAINED_FIELDS and not (legacy and k in _TOP_LEVEL))
    for key in unknown:
        notes.append(f"ignored {cfg_path}{key} in {path.name} (not a timm pretrained_cfg field)")
    try:
        parsed = {k: v for k, v in copy.deepcopy(raw).items() if not (legacy and k in unknown)}
        if not legacy:
            parsed["pretrained_cfg"] = {k: v for k, v in parsed["pretrained_cfg"].items() if k not in unknown}
        pretrained_cfg, arch, model_args = _parse_model_cfg(parsed, {})
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise KdcliError(f"{path}: timm cannot read it ({type(err).__name__}: {err}); fix or delete it") from err
    model_args = dict(model_args or {})
    for key in WEIGHT_SOURCE_ARGS:
        if key in model_args:
            model_args.pop(key)
            notes.append(f"ignored model_args.{key} in {path.name} (kdcli loads the weights beside it)")
    pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if k in _PRETRAINED_FIELDS}
    return ModelConfig(
        arch=arch,
        pretrained_cfg=pretrained_cfg,
        model_args=model_args,
        num_classes=pretrained_cfg.get("num_classes"),
        label_names=_label_list(pretrained_cfg.get("label_names")),
        preprocessing=stated_preprocessing(pretrained_cfg, path.name),
        notes=notes,
    )


_TOP_LEVEL = {"architecture", "num_features", "labels", "model_args", "global_pool"}


def read_metadata(metadata: dict[str, str], path: Path) -> ModelConfig:
    """The metadata kdcli writes into model.safetensors: arch, num_classes, data_config, model_args."""
    bad = _Checker(f"{path} (safetensors metadata)")
    decoded = {}
    for key in ("data_config", "model_args"):
        if key in metadata:
            try:
                decoded[key] = json.loads(metadata[key])
            except (json.JSONDecodeError, TypeError) as err:
                raise KdcliError(f"{path}: safetensors metadata field '{key}' is not JSON ({err}); "
                                 "re-save the file, or pass a config.json beside it") from err
            if not isinstance(decoded[key], (dict, type(None))):
                raise KdcliError(f"{path}: safetensors metadata field '{key}' must be a JSON object")
    data_config = decoded.get("data_config") or {}
    _check_preprocessing(bad, data_config, "data_config.")
    model_args = dict(decoded.get("model_args") or {})
    for key in WEIGHT_SOURCE_ARGS:
        model_args.pop(key, None)
    arch = metadata.get("arch") or None
    return ModelConfig(arch=arch, pretrained_cfg=None, model_args=model_args,
                       preprocessing=stated_preprocessing(data_config, "safetensors metadata"))


def registry_config(name: str, cfg: PretrainedCfg) -> ModelConfig:
    """timm's own registry config of a pretrained tag."""
    pretrained_cfg = cfg.to_dict()
    return ModelConfig(arch=name.partition(".")[0], pretrained_cfg=None, num_classes=cfg.num_classes,
                       label_names=_label_list(cfg.label_names),
                       preprocessing=stated_preprocessing(pretrained_cfg, f"timm's pretrained cfg of {name}"))


def stated_preprocessing(cfg: dict, source: str) -> Layer:
    """The preprocessing fields a (checked) pretrained_cfg states, as a layer named after where it is stated."""
    values = {}
    if cfg.get("input_size"):
        values["image_size"] = int(cfg["input_size"][-1])
    for key in ("mean", "std"):
        if cfg.get(key) is not None:
            values[key] = tuple(float(v) for v in cfg[key])
    for key in ("interpolation", "crop_mode"):
        if cfg.get(key):
            values[key] = cfg[key]
    if cfg.get("crop_pct") is not None:
        values["crop_pct"] = float(cfg["crop_pct"])
    return Layer(source, values)


def _label_list(labels) -> list[str] | None:
    if not labels:
        return None
    if isinstance(labels, dict):
        return [str(labels[k]) for k in sorted(labels, key=lambda k: int(k))]
    return [str(v) for v in labels]


def _check_preprocessing(bad: _Checker, cfg: dict, where: str) -> None:
    size = cfg.get("input_size")
    if size is not None:
        if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(_is_int(v) and v > 0 for v in size)):
            bad.fail(f"{where}input_size", size, "must be [channels, height, width] of positive whole numbers")
        if size[1] != size[2]:
            bad.fail(f"{where}input_size", size, "is not square (kdcli feeds square images): pass the image size flag")
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is None:
            continue
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(v) for v in value)):
            bad.fail(f"{where}{key}", value, "must be 3 finite numbers (one per RGB channel)")
        if key == "std" and min(value) <= 0:
            bad.fail(f"{where}{key}", value, "must be 3 positive numbers (a zero std divides by zero)")
    if cfg.get("interpolation") not in (None, "", *INTERPOLATIONS):
        bad.fail(f"{where}interpolation", cfg["interpolation"], f"must be one of {', '.join(INTERPOLATIONS)}")
    if cfg.get("crop_mode") not in (None, "", *CROP_MODES):
        bad.fail(f"{where}crop_mode", cfg["crop_mode"], f"must be one of {', '.join(CROP_MODES)}")
    crop = cfg.get("crop_pct")
    if crop is not None and not (_is_number(crop) and 0 < crop <= 1):
        bad.fail(f"{where}crop_pct", crop, "must be a number in (0, 1]")
    if "fixed_input_size" in cfg and not isinstance(cfg["fixed_input_size"], bool):
        bad.fail(f"{where}fixed_input_size", cfg["fixed_input_size"], "must be true or false")
    bad.count(cfg, "num_classes", where)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Checker:
    """Field checks that end in one line: '<file>: field '<path>' <what is wrong> (got <value>); fix or delete it'."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, name: str, value, problem: str):
        shown = json.dumps(value) if _jsonable(value) else repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise KdcliError(f"{self.where}: field '{name}' {problem} (got {shown}); fix the field or delete the file")

    def text(self, holder: dict, key: str, required: bool = False) -> None:
        if key not in holder:
            if required:
                raise KdcliError(f"{self.where}: no '{key}' field; timm needs the architecture name there")
            return
        if not isinstance(holder[key], str) or not holder[key]:
            self.fail(key, holder[key], "must be a timm architecture name (a string)")

    def mapping(self, holder: dict, key: str) -> dict:
        value = holder.get(key, {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, value, "must be a JSON object")
        return value

    def count(self, holder: dict, key: str, where: str = "") -> None:
        value = holder.get(key)
        if value is not None and not (_is_int(value) and value >= 0):
            self.fail(f"{where}{key}", value, "must be a whole number of classes")

    def labels(self, holder: dict, key: str, where: str = "") -> None:
        value = holder.get(key)
        if value is None:
            return
        if isinstance(value, dict):
            if not all(str(k).lstrip("-").isdigit() for k in value) or not all(isinstance(v, str) for v in value.values()):
                self.fail(f"{where}{key}", value, "must map class indices to names")
        elif not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            self.fail(f"{where}{key}", value, "must be a list of class names")


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
