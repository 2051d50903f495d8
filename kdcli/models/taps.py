"""Intermediate features of a timm model, by tap key, from the same forward pass that gives its logits.

Tap keys: `feature:N` (timm feature_info index N, negative counts from the end), `module:PATH` (any
named_modules() name), `penultimate` (the pooled pre-logits embedding: the input of the classifier).

`feature:N` comes from timm's `forward_intermediates` where the model has it: the layout timm normalises to
(NCHW maps; a ViT's patch tokens as a map, prefix tokens dropped), so spatial methods work on every family.
Other taps, and `feature:N` of models without `forward_intermediates`, come from forward hooks that live only
during that forward pass; a hooked value is copied when it is produced, so later in-place operations of the
model (an in-place ReLU, a residual `+=`) do not change it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kdcli.errors import KdcliError
from kdcli.models.modes import evaluating

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


def _unknown(model: nn.Module, key: str, side: str) -> KdcliError:
    return KdcliError(f"unknown {side} tap '{key}'; available: {describe_taps(model)}; "
                      "or module:<name> (kdcli inspect lists them)")


def _feature_index(model: nn.Module, key: str, side: str) -> int | None:
    """The non-negative feature_info index of a `feature:N` key (None for other kinds of key)."""
    kind, _, arg = key.partition(":")
    if kind != "feature":
        return None
    infos = getattr(model, "feature_info", None) or []
    if arg.lstrip("-").isdigit() and -len(infos) <= int(arg) < len(infos):
        return int(arg) % len(infos)
    raise _unknown(model, key, side)


def _from_intermediates(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_intermediates", None)) and callable(getattr(model, "forward_head", None))


def resolve(model: nn.Module, key: str, side: str) -> tuple[nn.Module, bool, int | None]:
    """(module, read its input instead of its output, channels timm says it has) of a tap read by a hook.
    Unknown keys list what is available."""
    modules = dict(model.named_modules())
    kind, _, arg = key.partition(":")
    if key == PENULTIMATE:
        return modules[_classifier_name(model)], True, None
    if kind == "feature":
        info = model.feature_info[_feature_index(model, key, side)]
        if info["module"] in modules:
            return modules[info["module"]], False, info.get("num_chs")
    elif kind == "module" and arg in modules and arg:
        return modules[arg], False, None
    raise _unknown(model, key, side)


def describe_taps(model: nn.Module) -> str:
    return ", ".join(
        f"{t.key} ({t.module}, {t.channels} ch" + (f", /{t.reduction})" if t.reduction else ")")
        for t in available_taps(model)
    )


def normalise(output: object, channels: int | None) -> torch.Tensor:
    """What methods expect: [B, C, H, W] maps, [B, N, C] tokens, [B, C] vectors. A channels-last map (some
    timm families) is permuted to channels-first; a tuple output (some blocks) gives its first tensor."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise KdcliError(f"a tapped module returned {type(output).__name__}, not a tensor; tap another module")
    if output.dim() == 4 and channels and output.shape[1] != channels and output.shape[-1] == channels:
        output = output.permute(0, 3, 1, 2)
    return output


@contextmanager
def capture(model: nn.Module, keys: tuple[str, ...], side: str):
    """Within the block, every forward of model fills the yielded dict {tap key: copy of the tensor}."""
    found: dict[str, torch.Tensor] = {}
    handles = []
    for key in keys:
        module, want_input, channels = resolve(model, key, side)
        if want_input:
            hook = module.register_forward_pre_hook(lambda _m, args, k=key: found.__setitem__(k, args[0].clone()))
        else:
            hook = module.register_forward_hook(
                lambda _m, _a, out, k=key, c=channels: found.__setitem__(k, normalise(out, c).clone())
            )
        handles.append(hook)
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def forward(model: nn.Module, images: torch.Tensor, keys: tuple[str, ...] = (),
            side: str = "model") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, {tap key: feature}) of one forward pass of images."""
    indices = {}
    if _from_intermediates(model):
        indices = {key: index for key in keys if (index := _feature_index(model, key, side)) is not None}
    with capture(model, tuple(k for k in keys if k not in indices), side) as found:
        if indices:
            wanted = sorted(set(indices.values()))
            final, maps = model.forward_intermediates(images, indices=wanted)
            logits = model.forward_head(final)
            by_index = dict(zip(wanted, maps))
            found.update({key: by_index[index] for key, index in indices.items()})
        else:
            logits = model(images)
    missing = [k for k in keys if k not in found]
    if missing:
        raise KdcliError(f"{side} tap '{missing[0]}' is never run in a forward pass; tap another module")
    return logits, {key: found[key] for key in keys}


@torch.no_grad()
def shapes(model: nn.Module, keys: tuple[str, ...], image_size: int, side: str = "model") -> dict[str, torch.Size]:
    """The shape of every tapped feature at this input size (batch of 2), from one dry forward in eval mode."""
    if not keys:
        return {}
    device = next(model.parameters()).device
    with evaluating(model):
        _, found = forward(model, torch.zeros(2, 3, image_size, image_size, device=device), keys, side)
    return {key: value.shape for key, value in found.items()}
