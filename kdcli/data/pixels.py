"""A training split's pixels, decoded once: uint8 tensors in memory where they fit, else read from the files on
every step (in loader workers).

Crops that need only a fixed-size image (`pad`, `none`) keep each image already resized and centre-cropped to
the training size, one [N, 3, S, S] tensor, so a batch is one gather; `resized` keeps each image at its own size.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from kdcli.data.config import DataConfig
from kdcli.data.sources import ArrayImages

MEMORY_SHARE = 0.5  # decode in memory when the pixels take at most this share of the available memory


def available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest machine
        return 4 << 30


def interpolation(config: DataConfig) -> InterpolationMode:
    return InterpolationMode(config.interpolation if config.interpolation != "random" else "bilinear")


def fit(image: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """A uint8 [3, H, W] image resized (shorter side to size / crop_pct) and centre-cropped to the training size,
    unless it already has that size."""
    size = config.image_size
    if tuple(image.shape[-2:]) == (size, size):
        return image
    image = TF.resize(image, [math.floor(size / config.crop_pct)], interpolation(config), antialias=True)
    return TF.center_crop(image, [size, size])


class Pixels:
    """uint8 pixels of a data set's images: `fixed(...)` gathers a batch of shifted, flipped [B, 3, S, S] crops
    of the training-size images (pad/none crops), `image(i)` gives one at its own size (resized crops).
    `in_memory` says whether they are decoded once, at the first read (else each read decodes its files)."""

    def __init__(self, base: Dataset, config: DataConfig, crop: str, budget: int | None = None):
        self.base, self.config, self.crop = base, config, crop
        self.fixed_size = crop != "resized"
        budget = int(available_memory() * MEMORY_SHARE) if budget is None else budget
        self.bytes = self._estimate_bytes()
        self.in_memory = self.bytes <= budget
        self._fixed: np.ndarray | None = None  # [N, S, S, 3], as ArrayImages hold them
        self._images: list[torch.Tensor] | None = None
        self._decoded = False

    def _estimate_bytes(self) -> int:
        if self.fixed_size:
            return len(self.base) * 3 * self.config.image_size ** 2
        if isinstance(self.base, ArrayImages):
            return self.base.images.nbytes
        sizes = getattr(self.base, "sizes", None) or [(1024, 1024)] * len(self.base)
        return 3 * sum(width * height for width, height in sizes)

    def _read(self, index: int) -> torch.Tensor:
        if isinstance(self.base, ArrayImages):
            return torch.from_numpy(np.ascontiguousarray(self.base.images[index])).permute(2, 0, 1)
        image, _ = self.base[index]
        return TF.pil_to_tensor(image)

    def _fitted(self, indices) -> np.ndarray:
        return np.stack([fit(self._read(i), self.config).permute(1, 2, 0).numpy() for i in indices])

    def _decode(self) -> None:
        if self._decoded or not self.in_memory:
            return
        self._decoded = True
        size = self.config.image_size
        if not self.fixed_size:
            self._images = [self._read(i).clone() for i in range(len(self.base))]
        elif isinstance(self.base, ArrayImages) and self.base.images.shape[1:3] == (size, size):
            self._fixed = self.base.images  # already decoded at the training size: no copy
        else:
            self._fixed = self._fitted(range(len(self.base)))

    def fixed(self, indices: list[int], shifts: np.ndarray, flips: np.ndarray) -> np.ndarray:
        """[B, 3, S, S] uint8: image indices[j] shifted by shifts[j] = (down, right) pixels (uncovered pixels 0,
        as a zero-padded crop), mirrored where flips[j]; one gather, no per-image work."""
        self._decode()
        if self._fixed is not None:
            source, rows_of = self._fixed, np.asarray(indices)
        else:
            source, rows_of = self._fitted(indices), np.arange(len(indices))
        size = self.config.image_size
        ramp = np.arange(size)
        rows = shifts[:, :1] + ramp  # [B, S]
        cols = shifts[:, 1:] + ramp
        cols = np.where(flips[:, None], cols[:, ::-1], cols)
        inside = ((rows >= 0) & (rows < size))[:, None, :, None] & ((cols >= 0) & (cols < size))[:, None, None, :]
        batch = source[rows_of[:, None, None, None], np.clip(rows, 0, size - 1)[:, None, :, None],
                       np.clip(cols, 0, size - 1)[:, None, None, :], np.arange(3)[None, :, None, None]]
        return np.where(inside, batch, np.uint8(0))

    def image(self, index: int) -> torch.Tensor:
        self._decode()
        return self._images[index] if self._images is not None else self._read(index)

    def labels(self, indices: list[int]) -> torch.Tensor:
        if isinstance(self.base, ArrayImages):
            return torch.as_tensor(self.base.labels[indices], dtype=torch.int64)
        return torch.tensor([self.base.labels[i] for i in indices], dtype=torch.int64)
