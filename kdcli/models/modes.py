"""Running a model in eval mode for a while without losing the mode it was in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model is in eval mode; afterwards every submodule has its own mode back (a model may
    hold frozen parts in eval mode while the rest trains, so a single `train(was_training)` is not enough)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
