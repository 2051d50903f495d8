"""How each model is fed: input size, mean, std, interpolation and crop, and where each value came from.

A model's preprocessing is resolved field by field from layers in priority order: the user's flags, what the
checkpoint states (config.json, safetensors metadata, timm's pretrained cfg of a tag), the data set's native size,
and last timm's defaults for the architecture. Every field remembers its layer, so the run plan can say which
values were stated and which were guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models import get_pretrained_cfg

from kdcli.data.config import DataConfig, Renormalize
from kdcli.errors import KdcliError

FIELDS = ("image_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
SIZE_FIELDS = ("image_size", "crop_pct", "crop_mode")  # a crop belongs with the size it was chosen for
GUESSES = ("native size", "timm default")  # layers that are kdcli's guesses, not something the model states


@dataclass(frozen=True)
class Layer:
    """Some preprocessing fields and where they come from (a flag, a file, a default)."""

    source: str
    values: dict
    field_sources: dict | None = None  # per-field sources of a merged layer

    def source_of(self, name: str) -> str:
        return (self.field_sources or {}).get(name, self.source)


def merge(*layers: Layer | None) -> Layer | None:
    """Layers read as one, the first having priority; each field keeps its own source."""
    layers = [layer for layer in layers if layer is not None and layer.values]
    if len(layers) <= 1:
        return layers[0] if layers else None
    values, sources = {}, {}
    for layer in reversed(layers):
        values.update(layer.values)
        sources.update({name: layer.source_of(name) for name in layer.values})
    return Layer(" / ".join(dict.fromkeys(sources.values())), values, sources)


@dataclass(frozen=True)
class Resolved:
    """A model's preprocessing with the source of each field."""

    config: DataConfig
    sources: dict[str, str]

    @property
    def guessed(self) -> list[str]:
        """The fields that no flag or file stated."""
        return [k for k in ("image_size", "mean", "std") if any(g in self.sources[k] for g in GUESSES)]

    def summary(self) -> dict:
        return {**self.config.pretrained_cfg(), "sources": dict(self.sources), "guessed": self.guessed}


def recipe_layer(image_size: int | None, mean, std) -> Layer:
    """The recipe's data.image_size, data.mean and data.std, where set."""
    values = {"image_size": image_size, "mean": tuple(mean) if mean else None, "std": tuple(std) if std else None}
    values = {k: v for k, v in values.items() if v is not None}
    return Layer("the recipe", values, {k: f"recipe data.{k}" for k in values})


def native_layer(native_size: int | None, description: str = "") -> Layer | None:
    """The data set's own image size, fed without resize or crop."""
    if not native_size:
        return None
    return Layer(f"native size of the data{description}", {"image_size": native_size, "crop_pct": 1.0})


def default_layer(arch: str) -> Layer:
    """timm's default preprocessing of an architecture."""
    cfg = get_pretrained_cfg(arch)
    return Layer(f"timm default for {arch.partition('.')[0]}", {
        "image_size": int(cfg.input_size[-1]), "mean": tuple(cfg.mean), "std": tuple(cfg.std),
        "interpolation": cfg.interpolation or "bilinear", "crop_pct": float(cfg.crop_pct or 0.875),
        "crop_mode": cfg.crop_mode or "center",
    })


def resolve(chains: dict[str, list[Layer | None]]) -> Resolved:
    """Each field from the first layer of its chain that has it."""
    values, sources = {}, {}
    for name in FIELDS:
        layer = next(layer for layer in chains[name] if layer is not None and name in layer.values)
        values[name], sources[name] = layer.values[name], layer.source_of(name)
    return Resolved(DataConfig(**values), sources)


def own_preprocessing(flags: Layer | None, stated: Layer | None, native: Layer | None, arch: str) -> Resolved:
    """A model fed as it was trained: flags, else what its checkpoint states, else native size and timm defaults."""
    chain = [flags, stated, native, default_layer(arch)]
    return resolve({name: chain for name in FIELDS})


def student_preprocessing(flags: Layer | None, start: Layer | None, teacher: Layer | None, native: Layer | None,
                          arch: str) -> Resolved:
    """The student's: size as asked, else the teacher's (so both see the same view unresized), else its start's;
    normalisation as asked, else its start's own, else the teacher's; the rest from the data and timm defaults."""
    default = default_layer(arch)
    size_chain = [flags, teacher, start, native, default]
    norm_chain = [flags, start, teacher, default]
    return resolve({name: size_chain if name in SIZE_FIELDS else norm_chain for name in FIELDS})


class TeacherInput(torch.nn.Module):
    """A batch prepared for the student, turned into what the teacher was trained on: resized to its input size
    (when the sizes differ) and re-normalised to its mean and std (as timm's DistillationTeacher does)."""

    def __init__(self, student: DataConfig, teacher: DataConfig):
        super().__init__()
        self.size = teacher.image_size if teacher.image_size != student.image_size else None
        self.mode = "bicubic" if teacher.interpolation == "bicubic" else "bilinear"
        self.renormalize = Renormalize(student, teacher)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, align_corners=False, antialias=True)
        return self.renormalize(x)


def teacher_input(student: DataConfig, teacher: DataConfig) -> torch.nn.Module | None:
    """The student-batch -> teacher-batch adapter, or None when the teacher takes the student's batch as it is."""
    same_norm = (teacher.mean, teacher.std) == (student.mean, student.std)
    if same_norm and teacher.image_size == student.image_size:
        return None
    return TeacherInput(student, teacher)


def describe_teacher_input(student: DataConfig, teacher: DataConfig) -> str:
    steps = []
    if teacher.image_size != student.image_size:
        steps.append(f"resized {student.image_size}->{teacher.image_size}")
    if (teacher.mean, teacher.std) != (student.mean, student.std):
        steps.append("re-normalised to its mean/std")
    return "the student's batch, " + " and ".join(steps) if steps else "the student's batch as it is"


def parse_channels(text: str | None, flag: str, positive: bool = False) -> tuple[float, float, float] | None:
    """'0.5,0.5,0.5' (or one value for all three channels) from a flag; a clear line when it is not that."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) for v in values) or (positive and min(values) <= 0):
        what = "positive numbers" if positive else "numbers"
        raise KdcliError(f"{flag} {text}: expected 3 comma-separated {what} (R,G,B), e.g. {flag} 0.5,0.5,0.5")
    return values


def preprocessing_flags(prefix: str, image_size: int | None, mean: str | None, std: str | None,
                        interpolation: str | None) -> Layer | None:
    """The layer of `--[teacher-]image-size/-mean/-std/-interpolation`, each value named by its flag."""
    from kdcli.models.config import INTERPOLATIONS

    if image_size is not None and image_size < 8:
        raise KdcliError(f"--{prefix}image-size {image_size}: must be 8 or more")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise KdcliError(f"--{prefix}interpolation {interpolation}: choose one of {', '.join(INTERPOLATIONS)}")
    values = {"image_size": image_size, "mean": parse_channels(mean, f"--{prefix}mean"),
              "std": parse_channels(std, f"--{prefix}std", positive=True), "interpolation": interpolation}
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return None
    names = {"image_size": "image-size"}
    return Layer(f"--{prefix}flags", values, {k: f"--{prefix}{names.get(k, k)}" for k in values})
