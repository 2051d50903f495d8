"""The built-in synthetic data set: seeded, no files, a task where capacity and soft targets matter."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SYNTHETIC_CLASSES = 10
SYNTHETIC_SIZE = 32
_SYNTHETIC_DEFAULT = {"train": 5000, "val": 1000}


def synthetic_images(n: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded 10-class 32×32 task, no files. Each class is a union of 12 smooth random colour patterns;
    an image shows one pattern of its class (shifted, contrast-jittered, noisy) blended with up to 50% of a
    random pattern of any class. Recognising 120 patterns through the blend takes capacity, so a small
    student alone trails a bigger teacher, and the teacher's soft outputs carry what the blend hides."""
    size, classes, patterns, margin = SYNTHETIC_SIZE, SYNTHETIC_CLASSES, 12, 8
    spec = torch.Generator().manual_seed(1234)  # the patterns: identical in every split
    coarse = torch.rand(classes * patterns, 3, 6, 6, generator=spec)
    bank = F.interpolate(coarse, size=size + margin, mode="bicubic", align_corners=False).clamp(0, 1)

    g = torch.Generator().manual_seed(split_seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    shown = labels * patterns + torch.randint(0, patterns, (n,), generator=g)
    blended = torch.randint(0, classes * patterns, (n,), generator=g)
    blend = torch.rand(n, 1, 1, 1, generator=g) * 0.5
    dx, dy = torch.randint(0, margin + 1, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(size))[:, :, None].expand(n, size, size)
    cols = (dx[:, None] + torch.arange(size))[:, None, :].expand(n, size, size)
    batch = torch.arange(n)[:, None, None]

    def crop(images: torch.Tensor) -> torch.Tensor:  # the same random shift for both patterns of an image
        return images[batch, :, rows, cols].permute(0, 3, 1, 2)

    img = (1 - blend) * crop(bank[shown]) + blend * crop(bank[blended])
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    img = (img - 0.5) * contrast + 0.5 + 0.1 * torch.randn(n, 3, size, size, generator=g)
    pixels = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return pixels.numpy(), labels.numpy()
