"""Data sets: ImageFolder roots, CIFAR python folders and the built-in synthetic set, with train and val splits."""

from __future__ import annotations

import pickle  # CIFAR's python batches are pickles: read only through _ArrayOnlyUnpickler below
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from kdcli.data.synthetic import _SYNTHETIC_DEFAULT, SYNTHETIC_CLASSES, SYNTHETIC_SIZE, synthetic_images
from kdcli.errors import KdcliError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


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

    def __init__(self, files: list[Path], labels: list[int], sizes: list[tuple[int, int]] | None = None):
        self.files, self.labels, self.sizes = files, labels, sizes  # sizes: (width, height) per file, if known

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
    native_size: int | None  # the images' own size when all share one square size
    sizes: str = ""  # what the images' sizes are, for the run plan

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
    datasets, sizes = {}, set()
    for split, (folder, _) in splits.items():
        files, labels, file_sizes = [], [], []
        for index, name in enumerate(classes):
            found = sorted(
                p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            if not found:
                raise KdcliError(
                    f"class folder {folder / name} has no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...); "
                    "add images or remove the folder"
                )
            file_sizes += _check_headers(found)
            files += found
            labels += [index] * len(found)
        sizes |= set(file_sizes)
        datasets[split] = FileImages(files, labels, file_sizes)
    desc = f"ImageFolder {root} ({len(datasets['train'])} train / {len(datasets['val'])} val, {len(classes)} classes)"
    native, note = _native_size(sizes)
    return DataSource(desc, datasets["train"], datasets["val"], classes, native_size=native, sizes=note)


def _native_size(sizes: set[tuple[int, int]]) -> tuple[int | None, str]:
    """(the images' shared square size or None, what their sizes are)."""
    if len(sizes) == 1:
        (width, height), = sizes
        return (width if width == height else None), f"all {width}x{height}"
    smallest, largest = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
    return None, f"{len(sizes)} sizes, {smallest[0]}x{smallest[1]} to {largest[0]}x{largest[1]}"


def _check_headers(files: list[Path]) -> list[tuple[int, int]]:
    """Open every image's header before training (no decoding; 5000 PNGs took 0.2 s), so a stray non-image fails
    up front instead of hours into a run; returns the size each header declares."""
    sizes = []
    for path in files:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise KdcliError(f"cannot read image {path}: {err}; remove or replace the file") from err
    return sizes


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
    return DataSource(desc, train, val, classes, native_size=32, sizes="all 32x32")


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
    return DataSource(desc, train, val, classes, native_size=SYNTHETIC_SIZE,
                      sizes=f"all {SYNTHETIC_SIZE}x{SYNTHETIC_SIZE}")
