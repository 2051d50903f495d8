"""How images are fed to a model (timm's pretrained_cfg keys), and re-normalising a batch for another model."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataConfig:
    """How images are fed to a model; recorded in the student's config.json (timm's pretrained_cfg keys)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    def pretrained_cfg(self) -> dict:
        return {
            "input_size": [3, self.image_size, self.image_size],
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    @classmethod
    def from_pretrained_cfg(cls, cfg: dict) -> DataConfig:
        return cls(
            image_size=int(cfg["input_size"][-1]),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            interpolation=cfg.get("interpolation") or "bilinear",
            crop_pct=float(cfg.get("crop_pct") or 1.0),
            crop_mode=cfg.get("crop_mode") or "center",
        )


class Renormalize(torch.nn.Module):
    """Re-normalise a batch prepared for one (mean, std) into another, as timm's DistillationTeacher does."""

    def __init__(self, source: DataConfig, target: DataConfig):
        super().__init__()
        to = lambda v: torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)  # noqa: E731
        self.register_buffer("scale", to(source.std) / to(target.std))
        self.register_buffer("shift", (to(source.mean) - to(target.mean)) / to(target.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift
