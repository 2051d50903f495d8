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
import os
import random

import numpy as np
import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms.v2 import functional as TF

from kdcli import distributed
from kdcli.data.config import DataConfig
from kdcli.data.pixels import Pixels, interpolation


class TrainView(Dataset):
    """Augmented training view: (image, label, index); the random choices for sample i in epoch e of stage k
    are seeded by (seed, k, e, i). `at(k, e)` gives the view of one stage's epoch.

    With `views=K`, every image has K fixed views instead (view v of sample i seeded by (seed, v, i)), and epoch
    e of stage k shows view `view_ids` drawn by (seed, k, e, i): what lets a source's outputs be stored per view.
    Pixels are decoded once (see pixels.py) and a batch is augmented on uint8 tensors, then normalised at once."""

    def __init__(self, base: Dataset, config: DataConfig, hflip: bool, crop: str, seed: int,
                 views: int | None = None, memory_budget: int | None = None):
        self.base, self.config, self.hflip, self.crop, self.seed, self.views = base, config, hflip, crop, seed, views
        self.stage = self.epoch = 0
        self.pixels = Pixels(base, config, crop, memory_budget)
        mean, std = np.array(config.mean)[:, None], np.array(config.std)[:, None]
        self._lut = ((np.arange(256) / 255 - mean) / std).astype(np.float32)  # [channel, uint8 value]

    def at(self, stage: int, epoch: int) -> TrainView:
        view = copy.copy(self)
        view.stage, view.epoch = stage, epoch
        return view

    def __len__(self) -> int:
        return len(self.base)

    def view_ids(self, indices: list[int]) -> list[int]:
        """Which of the K views each sample shows in this stage's epoch."""
        return [random.Random(f"{self.seed}/{self.stage}/{self.epoch}/{i}").randrange(self.views) for i in indices]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        images, labels, _ = self.__getitems__([index])
        return images[0], int(labels[0]), index

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole batch at once (torch's fetcher calls this): images, labels, sample indices."""
        if self.views is None:
            keys = [f"{self.seed}/{self.stage}/{self.epoch}/{i}" for i in indices]
            return self._augment(indices, keys), self.pixels.labels(indices), torch.tensor(indices)
        return self.of_views(indices, self.view_ids(indices)), self.pixels.labels(indices), torch.tensor(indices)

    def of_views(self, indices: list[int], view_ids: list[int]) -> torch.Tensor:
        """The images of view view_ids[j] of sample indices[j] (with `views=K`)."""
        return self._augment(indices, [f"{self.seed}/view{v}/{i}" for i, v in zip(indices, view_ids)])

    def _augment(self, indices: list[int], keys: list[str]) -> torch.Tensor:
        """Augment and normalise a batch; numpy gathers (one thread, no per-image tensor ops) then one lookup
        from uint8 to normalised float."""
        rngs = [random.Random(key) for key in keys]
        size = self.config.image_size
        if self.crop == "resized":
            images = []
            for index, rng in zip(indices, rngs):
                image = self.pixels.image(index)
                box = _resized_crop_box((image.shape[-1], image.shape[-2]), rng)
                images.append(TF.resized_crop(image, *box, [size, size], interpolation(self.config), antialias=True))
            batch = torch.stack(images).numpy()
            flips = np.array([self.hflip and rng.random() < 0.5 for rng in rngs])
            batch[flips] = batch[flips][..., ::-1]
        else:
            pad = max(size // 8, 1) if self.crop == "pad" else 0
            shifts = np.array([(rng.randint(0, 2 * pad) - pad, rng.randint(0, 2 * pad) - pad) if pad else (0, 0)
                               for rng in rngs]).reshape(-1, 2)
            flips = np.array([self.hflip and rng.random() < 0.5 for rng in rngs])
            batch = self.pixels.fixed(indices, shifts, flips)
        return torch.from_numpy(self._lut[np.arange(3)[None, :, None, None], batch])


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
                 start_batch: int = 0, pin_memory: bool = False) -> DataLoader:
    """The loader of one epoch of a stage from its start_batch-th batch: the order depends on (order_seed, epoch),
    the views on (the view's seed, stage, epoch). Its own generator: creating it draws nothing from torch's
    global one (a DataLoader without one takes its workers' base seed from there). Under several processes
    batch_size is the global batch: each process loads its share of every batch, so the global order is the
    one-process order."""
    batches = [distributed.share(b) for b in epoch_batches(len(view), batch_size, order_seed, epoch)[start_batch:]]
    generator = torch.Generator().manual_seed(order_seed * 1_000_003 + epoch)
    return DataLoader(view.at(stage, epoch), batch_sampler=batches, num_workers=workers, generator=generator,
                      collate_fn=_as_batched, pin_memory=pin_memory)


def _as_batched(batch):
    """TrainView.__getitems__ returns the batch already stacked."""
    return batch


def auto_workers(view: TrainView) -> int:
    """Loader workers for `workers: auto`: none when the pixels are in memory and crops are batched (a worker
    would only add copies between processes), else all cores but one (at most 8) to decode and resize."""
    if view.pixels.in_memory and view.crop != "resized":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def eval_loader(view: EvalView, batch_size: int, workers: int) -> DataLoader:
    """In order; under several processes, this process's block of the samples (metrics.predict gathers them)."""
    if distributed.world_size() > 1:
        view = Subset(view, distributed.shard(len(view)))
    return DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=workers)
