"""A stage's optimizer and learning-rate schedule: their recipe settings and how they are built."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from timm.optim import param_groups_weight_decay
from torch import nn

from kdcli.training.methods.base import FLOAT32_MAX


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class OptimizerSettings(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(
        0.05, gt=0, le=FLOAT32_MAX, description="must fit in float32; too high a value shows as a loss that is not finite"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    nesterov: bool = Field(True, description="sgd only")
    weight_decay: float = Field(
        5e-4, ge=0, le=FLOAT32_MAX, description="on weights of 2 or more dimensions; biases and norm weights are not decayed"
    )


class ScheduleSettings(_Strict):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, le=10000, description="linear warm-up from lr/100, in epochs (may be fractional)")


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two groups, as timm builds them: decayed weights, and undecayed 1-D parameters (biases, norm weights) plus
    whatever a model lists in no_weight_decay() (a ViT's position embedding and class token)."""
    decayed, undecayed = [], []
    for module in modules:
        skip = module.no_weight_decay() if callable(getattr(module, "no_weight_decay", None)) else ()
        for group in param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip):
            (decayed if group["weight_decay"] else undecayed).extend(group["params"])
    groups = [{"params": undecayed, "weight_decay": 0.0}, {"params": decayed, "weight_decay": weight_decay}]
    return [group for group in groups if group["params"]]


def make_optimizer(settings: OptimizerSettings, modules: Iterable[nn.Module]) -> torch.optim.Optimizer:
    """torch's fused kernel (one pass over every parameter) where the parameters' device has one, else its default:
    on CPU that updates tensor by tensor (benchmarks/model_side.py: a KD step 1.10x faster with the fused SGD)."""
    groups = param_groups(modules, settings.weight_decay)
    if settings.name == "adamw":
        build = lambda fused: torch.optim.AdamW(groups, lr=settings.lr, fused=fused)  # noqa: E731
    else:
        build = lambda fused: torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum,  # noqa: E731
                                              nesterov=settings.nesterov and settings.momentum > 0, fused=fused)
    try:
        return build(True)
    except RuntimeError:  # a device or dtype without a fused kernel
        return build(None)


def lr_factor(settings: ScheduleSettings, step: int, total: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at a step: linear warm-up from 1%, then cosine to 0 or constant."""
    warmup = round(settings.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    if settings.name == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_schedule(settings: ScheduleSettings, optimizer: torch.optim.Optimizer, total: int,
                  steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(settings, step, total, steps_per_epoch)
    )
