"""How each model is fed: input size, mean, std, interpolation and crop, from its own config or timm's defaults."""

from __future__ import annotations

from timm.models import get_pretrained_cfg

from kdcli.data.config import DataConfig
from kdcli.models.checkpoint import LoadedModel


def arch_default_config(arch: str, native_size: int | None) -> DataConfig:
    """timm's default preprocessing of an architecture; at a data set's native size, no resize or crop."""
    cfg = get_pretrained_cfg(arch)
    return DataConfig(
        image_size=native_size or int(cfg.input_size[-1]),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation=cfg.interpolation or "bilinear",
        crop_pct=1.0 if native_size else float(cfg.crop_pct or 0.875),
        crop_mode=cfg.crop_mode or "center",
    )


def own_config(loaded: LoadedModel, native_size: int | None) -> DataConfig:
    """A model's own preprocessing: recorded with its weights, else its architecture's defaults."""
    return loaded.data_config or arch_default_config(loaded.arch, native_size)


def student_data_config(
    image_size: int | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
    teacher: LoadedModel | None,
    student: LoadedModel | None,
    student_arch: str,
    native: int | None,
) -> DataConfig:
    """Size as asked, else the teacher's config; normalisation as asked, else the starting student's own, else
    the teacher's; whatever is still open from the architecture's timm defaults."""
    size_source = next((m.data_config for m in (teacher, student) if m and m.data_config), None)
    norm_source = next((m.data_config for m in (student, teacher) if m and m.data_config), None)
    base = size_source or arch_default_config(student_arch, native)
    return DataConfig(
        image_size=image_size or base.image_size,
        mean=mean or (norm_source or base).mean,
        std=std or (norm_source or base).std,
        interpolation=base.interpolation,
        crop_pct=base.crop_pct,
        crop_mode=base.crop_mode,
    )
