"""Data sets (ImageFolder, CIFAR python folders, built-in synthetic), their transforms and seeded loaders.

Training views are deterministic: the augmentation of sample i in epoch e depends only on (seed, e, i),
not on worker count or on what else drew random numbers, so a run and its resumption see the same batches.
Evaluation uses timm's own `create_transform` on the recorded data config, so `kdcli eval` and a timm user
preprocess the exported student identically.
"""

from __future__ import annotations

import math
import pickle  # CIFAR's python batches are pickles: read only through _ArrayOnlyUnpickler below
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from kdcli.errors import KdcliError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


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


# ---------------------------------------------------------------- data sets


class ArrayImages(Dataset):
    """Images held in memory as uint8 [N, H, W, 3]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


class FileImages(Dataset):
    """Image files with their class indices; a file that cannot be decoded is a usage error naming it."""

    def __init__(self, files: list[Path], labels: list[int]):
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), self.labels[index]
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise KdcliError(f"cannot read image {path}: {err}; remove or replace the file") from err


@dataclass
class DataSource:
    """A data set with train and val splits and its class names."""

    description: str
    train: Dataset
    val: Dataset
    classes: list[str]
    native_size: int | None  # the images' own size when all share one (CIFAR, synthetic)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def open_data(spec: str) -> DataSource:
    """`synthetic[:train=N,val=M]`, an ImageFolder root with train/ and val/, or a CIFAR python folder."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return _synthetic_source(spec)
    root = Path(spec)
    if not root.exists():
        raise KdcliError(f"data folder {spec} does not exist; pass an ImageFolder root, a CIFAR folder or 'synthetic'")
    if not root.is_dir():
        raise KdcliError(f"--data {spec} is a file; pass a folder with train/ and val/, a CIFAR folder or 'synthetic'")
    for name in ("cifar-10-batches-py", "cifar-100-python"):
        if (root / name).is_dir():
            root = root / name
    if (root / "data_batch_1").is_file() or ((root / "train").is_file() and (root / "meta").is_file()):
        return _cifar_source(root)
    return _image_folder_source(root)


def _image_folder_source(root: Path) -> DataSource:
    splits = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise KdcliError(
                f"data folder {root} has no {split}/ folder; an ImageFolder root needs train/<class>/* and val/<class>/*"
            )
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise KdcliError(f"{folder} has no class folders; put each class's images in {folder}/<class name>/")
        splits[split] = (folder, classes)
    classes = splits["train"][1]
    if splits["val"][1] != classes:
        extra = sorted(set(splits["val"][1]) ^ set(classes))
        raise KdcliError(f"train/ and val/ in {root} have different class folders (differ: {', '.join(extra[:5])})")
    datasets = {}
    for split, (folder, _) in splits.items():
        files, labels = [], []
        for index, name in enumerate(classes):
            found = sorted(
                p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            if not found:
                raise KdcliError(
                    f"class folder {folder / name} has no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...); "
                    "add images or remove the folder"
                )
            _check_headers(found)
            files += found
            labels += [index] * len(found)
        datasets[split] = FileImages(files, labels)
    desc = f"ImageFolder {root} ({len(datasets['train'])} train / {len(datasets['val'])} val, {len(classes)} classes)"
    return DataSource(desc, datasets["train"], datasets["val"], classes, native_size=None)


def _check_headers(files: list[Path]) -> None:
    """Open every image's header before training (no decoding; 5000 PNGs took 0.2 s), so a stray non-image fails
    up front instead of hours into a run."""
    for path in files:
        try:
            with Image.open(path):
                pass
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise KdcliError(f"cannot read image {path}: {err}; remove or replace the file") from err


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickled dicts of numpy arrays: allow exactly numpy's array reconstruction, no code.
    (_codecs.encode turns text into bytes: Python 3 pickles bytes that way at protocol 2.)"""

    ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            batch = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise KdcliError(f"cannot read CIFAR batch {path}: {err}; re-extract the CIFAR archive") from err
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar_source(root: Path) -> DataSource:
    if (root / "data_batch_1").is_file():
        train_files = [root / f"data_batch_{i}" for i in range(1, 6)]
        val_files, label_key, meta, names_key = [root / "test_batch"], "labels", root / "batches.meta", "label_names"
    else:
        train_files, val_files, label_key, meta, names_key = [root / "train"], [root / "test"], "fine_labels", root / "meta", "fine_label_names"
    missing = [p.name for p in [*train_files, *val_files, meta] if not p.is_file()]
    if missing:
        raise KdcliError(f"CIFAR folder {root} is incomplete (missing {', '.join(missing)}); re-extract the archive")

    def load(files: list[Path]) -> ArrayImages:
        batches = [_read_cifar_batch(p) for p in files]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        return ArrayImages(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)

    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in _read_cifar_batch(meta)[names_key]]
    train, val = load(train_files), load(val_files)
    desc = f"CIFAR {root} ({len(train)} train / {len(val)} val, {len(classes)} classes)"
    return DataSource(desc, train, val, classes, native_size=32)


# ---------------------------------------------------------------- synthetic


SYNTHETIC_CLASSES = 10
SYNTHETIC_SIZE = 32
_SYNTHETIC_DEFAULT = {"train": 5000, "val": 1000}


def _synthetic_source(spec: str) -> DataSource:
    counts = dict(_SYNTHETIC_DEFAULT)
    _, _, args = spec.partition(":")
    for item in filter(None, args.split(",")):
        key, _, value = item.partition("=")
        if key not in counts or not value.isdigit() or int(value) < 1:
            raise KdcliError(f"--data {spec}: expected synthetic:train=N,val=M with positive whole numbers")
        counts[key] = int(value)
    train = ArrayImages(*synthetic_images(counts["train"], split_seed=1))
    val = ArrayImages(*synthetic_images(counts["val"], split_seed=2))
    classes = [f"class_{i}" for i in range(SYNTHETIC_CLASSES)]
    desc = f"synthetic ({counts['train']} train / {counts['val']} val, {SYNTHETIC_CLASSES} classes, 32x32)"
    return DataSource(desc, train, val, classes, native_size=SYNTHETIC_SIZE)


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


# ---------------------------------------------------------------- transforms and loaders


class TrainView(Dataset):
    """Augmented training view; the random choices for sample i in epoch e are seeded by (seed, e, i)."""

    def __init__(self, base: Dataset, config: DataConfig, hflip: bool, crop: str, seed: int):
        self.base, self.config, self.hflip, self.crop, self.seed = base, config, hflip, crop, seed
        self.epoch = 0
        self._interp = InterpolationMode(config.interpolation if config.interpolation != "random" else "bilinear")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, label = self.base[index]
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
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
        return TF.normalize(TF.to_tensor(img), self.config.mean, self.config.std), label


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


def train_loader(view: TrainView, batch_size: int, seed: int, epoch: int, workers: int,
                 start_batch: int = 0) -> DataLoader:
    """The loader of one epoch from its start_batch-th batch: order and views depend on (seed, epoch) only."""
    view.epoch = epoch
    batches = epoch_batches(len(view), batch_size, seed, epoch)[start_batch:]
    return DataLoader(view, batch_sampler=batches, num_workers=workers)


def eval_loader(view: EvalView, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=workers)


def with_size(config: DataConfig, image_size: int | None) -> DataConfig:
    return config if image_size is None else replace(config, image_size=image_size)


class Renormalize(torch.nn.Module):
    """Re-normalise a batch prepared for one (mean, std) into another, as timm's DistillationTeacher does."""

    def __init__(self, source: DataConfig, target: DataConfig):
        super().__init__()
        to = lambda v: torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)  # noqa: E731
        self.register_buffer("scale", to(source.std) / to(target.std))
        self.register_buffer("shift", (to(source.mean) - to(target.mean)) / to(target.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift
