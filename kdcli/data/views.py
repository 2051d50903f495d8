"""Training and evaluation views of a data set, and the seeded loaders that serve them.

Training views are deterministic: the augmentation of sample i in epoch e of stage k depends only on
(seed, k, e, i), not on worker count or on what else drew random numbers, so a run and its resumption see the
same batches, and every stage and epoch sees views of its own. The loaders draw no number from torch's global
generator either (they have their own), so a student's dropout draws the same numbers after a resume.
Evaluation uses timm's own `create_transform` on the recorded data config, so `kdcli eval` and a timm user
preprocess the exported student identically.
"""

from __future__ import annotations

import copy
import math
import random

import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from kdcli import distributed
from kdcli.data.config import DataConfig


class TrainView(Dataset):
    """Augmented training view: (image, label, index); the random choices for sample i in epoch e of stage k
    are seeded by (seed, k, e, i). `at(k, e)` gives the view of one stage's epoch."""

    def __init__(self, base: Dataset, config: DataConfig, hflip: bool, crop: str, seed: int):
        self.base, self.config, self.hflip, self.crop, self.seed = base, config, hflip, crop, seed
        self.stage = self.epoch = 0
        self._interp = InterpolationMode(config.interpolation if config.interpolation != "random" else "bilinear")

    def at(self, stage: int, epoch: int) -> TrainView:
        view = copy.copy(self)
        view.stage, view.epoch = stage, epoch
        return view

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        img, label = self.base[index]
        rng = random.Random(f"{self.seed}/{self.stage}/{self.epoch}/{index}")
        size = self.config.image_size
        if self.crop == "resized":
            img = TF.resized_crop(img, *_resized_crop_box(img.size, rng), [size, size], self._interp)
        else:
            if img.size != (size, size):
                img = TF.center_crop(TF.resize(img, math.floor(size / self.config.crop_pct), self._interp), size)
            if self.crop == "pad":
                pad = max(size // 8, 1)
                img = TF.crop(TF.pad(img, pad), rng.randint(0, 2 * pad), rng.randint(0, 2 * pad), size, size)
        if self.hflip and rng.random() < 0.5:
            img = TF.hflip(img)
        return TF.normalize(TF.to_tensor(img), self.config.mean, self.config.std), label, index


def _resized_crop_box(image_size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop with 25–100% of the area and aspect 3/4–4/3."""
    width, height = image_size
    for _ in range(10):
        area = width * height * rng.uniform(0.25, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


class EvalView(Dataset):
    """Evaluation view through timm's create_transform, exactly as a timm user would preprocess."""

    def __init__(self, base: Dataset, config: DataConfig):
        self.base = base
        self.transform = create_transform(
            input_size=(3, config.image_size, config.image_size),
            interpolation=config.interpolation,
            mean=config.mean,
            std=config.std,
            crop_pct=config.crop_pct,
            crop_mode=config.crop_mode,
            is_training=False,
        )

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, label = self.base[index]
        return self.transform(img), label


def epoch_batches(size: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch, a seeded shuffle; no size-1 tail batch (batch norm cannot train on it)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    batches = [order[i : i + batch_size] for i in range(0, size, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def train_loader(view: TrainView, batch_size: int, order_seed: int, stage: int, epoch: int, workers: int,
                 start_batch: int = 0) -> DataLoader:
    """The loader of one epoch of a stage from its start_batch-th batch: the order depends on (order_seed, epoch),
    the views on (the view's seed, stage, epoch). Its own generator: creating it draws nothing from torch's
    global one (a DataLoader without one takes its workers' base seed from there). Under several processes
    batch_size is the global batch: each process loads its share of every batch, so the global order is the
    one-process order."""
    batches = [distributed.share(b) for b in epoch_batches(len(view), batch_size, order_seed, epoch)[start_batch:]]
    generator = torch.Generator().manual_seed(order_seed * 1_000_003 + epoch)
    return DataLoader(view.at(stage, epoch), batch_sampler=batches, num_workers=workers, generator=generator)


def eval_loader(view: EvalView, batch_size: int, workers: int) -> DataLoader:
    """In order; under several processes, this process's block of the samples (metrics.predict gathers them)."""
    if distributed.world_size() > 1:
        view = Subset(view, distributed.shard(len(view)))
    return DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=workers)
