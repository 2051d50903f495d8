"""Intermediate features of a timm model, by tap key, through forward hooks that live only while needed.

Tap keys: `feature:N` (timm feature_info index N), `module:PATH` (any named_modules() name), `penultimate`
(the pooled pre-logits embedding: the input of the classifier).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kdcli.errors import KdcliError

PENULTIMATE = "penultimate"


@dataclass(frozen=True)
class TapInfo:
    key: str
    module: str
    channels: int | None
    reduction: int | None


def available_taps(model: nn.Module) -> list[TapInfo]:
    """The taps a user can name on this model: every feature_info entry, and the penultimate embedding."""
    taps = []
    for index, info in enumerate(getattr(model, "feature_info", None) or []):
        taps.append(TapInfo(f"feature:{index}", info["module"], info.get("num_chs"), info.get("reduction")))
    classifier = _classifier_name(model)
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    taps.append(TapInfo(PENULTIMATE, f"input of {classifier}", width, None))
    return taps


def _classifier_name(model: nn.Module) -> str:
    target = model.get_classifier()
    for name, module in model.named_modules():
        if module is target:
            return name
    raise KdcliError(f"{type(model).__name__} has no classifier module to tap the penultimate embedding from")


def resolve(model: nn.Module, key: str, side: str) -> tuple[nn.Module, bool]:
    """(module, read its input instead of its output) for a tap key; unknown keys list what is available."""
    modules = dict(model.named_modules())
    kind, _, arg = key.partition(":")
    if key == PENULTIMATE:
        return modules[_classifier_name(model)], True
    if kind == "feature":
        infos = getattr(model, "feature_info", None) or []
        if arg.isdigit() and int(arg) < len(infos) and infos[int(arg)]["module"] in modules:
            return modules[infos[int(arg)]["module"]], False
    elif kind == "module" and arg in modules and arg:
        return modules[arg], False
    listed = ", ".join(
        f"{t.key} ({t.module}, {t.channels} ch" + (f", /{t.reduction})" if t.reduction else ")")
        for t in available_taps(model)
    )
    raise KdcliError(f"unknown {side} tap '{key}'; available: {listed}; or module:<name> (kdcli inspect lists them)")


@contextmanager
def capture(model: nn.Module, keys: tuple[str, ...], side: str):
    """Within the block, every forward of model fills the yielded dict {tap key: tensor}."""
    found: dict[str, torch.Tensor] = {}
    handles = []
    for key in keys:
        module, want_input = resolve(model, key, side)
        if want_input:
            handles.append(module.register_forward_pre_hook(lambda _m, args, k=key: found.__setitem__(k, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, k=key: found.__setitem__(k, out)))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()
