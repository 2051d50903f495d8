"""Data sets: ImageFolder roots, CIFAR python folders and the built-in synthetic set, with train and val splits."""

from __future__ import annotations

import hashlib
import io
import os
import pickle  # CIFAR's python batches are pickles: read only through _ArrayOnlyUnpickler below
import stat
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
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


def read_image(path: Path) -> Image.Image:
    """An image file as RGB; a file PIL cannot decode is a usage error naming it (see _opening)."""
    with _opening(path) as img:
        return img.convert("RGB")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as the header declares them, without decoding; a bad header is a usage error."""
    with _opening(path) as img:
        return img.size


@contextmanager
def _opening(path: Path):
    """An opened image. Whatever PIL raises on a bad file (its error types vary by format: OSError, SyntaxError,
    struct.error, ...), and an image whose header declares more pixels than PIL's decompression-bomb limit, is a
    usage error naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                yield img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise KdcliError(
            f"image {path} declares more pixels than PIL's limit of {Image.MAX_IMAGE_PIXELS} (a possible decompression "
            f"bomb: {str(err).partition(' exceeds')[0]}); resize or remove it"
        ) from err
    except MemoryError as err:
        raise KdcliError(f"image {path} is too large to decode in memory; resize or remove it") from err
    except KdcliError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure means this file is not a usable image
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KdcliError(f"cannot read image {path}: {reason}; remove or replace the file") from err


class FileImages(Dataset):
    """Image files with their class indices; a file that cannot be decoded is a usage error naming it."""

    def __init__(self, files: list[Path], labels: list[int], sizes: list[tuple[int, int]] | None = None):
        self.files, self.labels, self.sizes = files, labels, sizes  # sizes: (width, height) per file, if known

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return read_image(self.files[index]), self.labels[index]


@dataclass
class DataSource:
    """A data set with train and val splits and its class names."""

    description: str
    train: Dataset
    val: Dataset
    classes: list[str]
    native_size: int | None  # the images' own size when all share one square size
    sizes: str = ""  # what the images' sizes are, for the run plan
    identity: dict = field(default_factory=dict)  # what defines the data, compared on --resume (see jobs/resume.py)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def is_synthetic(spec: str) -> bool:
    return spec == "synthetic" or spec.startswith("synthetic:")


def open_data(spec: str) -> DataSource:
    """`synthetic[:train=N,val=M]`, an ImageFolder root with train/ and val/, or a CIFAR python folder."""
    if is_synthetic(spec):
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
    try:
        return _list_image_folder(root)
    except OSError as err:  # a folder that cannot be listed (permissions, a dead mount, a symlink loop)
        where = err.filename or root
        raise KdcliError(f"cannot read the data folder {where} ({err.strerror or err}); check its permissions") from err


def _list_image_folder(root: Path) -> DataSource:
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
    datasets, sizes, identity = {}, set(), {"classes": classes}
    for split, (folder, _) in splits.items():
        datasets[split], identity[split] = _read_classes(folder, classes, sizes)
    desc = f"ImageFolder {root} ({len(datasets['train'])} train / {len(datasets['val'])} val, {len(classes)} classes)"
    native, note = _native_size(sizes)
    return DataSource(desc, datasets["train"], datasets["val"], classes, native_size=native, sizes=note,
                      identity=identity)


def _read_classes(folder: Path, classes: list[str], sizes: set) -> tuple[FileImages, dict]:
    """The images of folder/<class>/ for each class (labels in that order), and the listing's identity; adds the
    images' sizes to `sizes`."""
    files, labels, file_sizes, identity = [], [], [], {}
    for index, name in enumerate(classes):
        found = _image_files(folder / name)
        if not found:
            raise KdcliError(
                f"class folder {folder / name} has no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...); "
                "add images or remove the folder"
            )
        file_sizes += [image_size(path) for path, _ in found]  # every header before training (5000 PNGs: 0.2 s)
        identity[name] = _listing_identity(folder / name, found)
        files += [path for path, _ in found]
        labels += [index] * len(found)
    sizes |= set(file_sizes)
    return FileImages(files, labels, file_sizes), identity


def open_eval_data(spec: str, split: str | None = None) -> DataSource:
    """What `kdcli eval` measures on (the DataSource's val): the val split of `spec`; with split, the class folders
    in spec/split (e.g. test/); a folder of class folders itself when it has no train/ or val/ (a held-out set)."""
    root = Path(spec)
    if split is None:
        held_out = not is_synthetic(spec) and root.is_dir() and not (root / "train").is_dir() and not _is_cifar(root)
        if not held_out:
            return open_data(spec)
        folder = root / "val" if (root / "val").is_dir() else root
    else:
        if is_synthetic(spec) or _is_cifar(root):
            raise KdcliError(f"--split {split}: {spec} has fixed splits (eval uses its test/val split); pass --split "
                             "only with an image folder")
        folder = root / split
        if not folder.is_dir():
            raise KdcliError(f"--split {split}: {folder} is not a folder; pass the name of a folder of class folders "
                             f"in {spec} (e.g. test, val)")
    try:
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise KdcliError(f"{folder} has no class folders; eval needs <class name>/ folders of images there "
                             "(or train/ and val/)")
        sizes: set = set()
        images, identity = _read_classes(folder, classes, sizes)
    except OSError as err:
        raise KdcliError(f"cannot read the data folder {err.filename or folder} ({err.strerror or err}); check its "
                         "permissions") from err
    native, note = _native_size(sizes)
    desc = f"ImageFolder {folder} ({len(images)} images, {len(classes)} classes)"
    return DataSource(desc, FileImages([], []), images, classes, native_size=native, sizes=note,
                      identity={"classes": classes, "eval": identity})


def _is_cifar(root: Path) -> bool:
    return any((root / name).is_dir() for name in ("cifar-10-batches-py", "cifar-100-python")) or \
        (root / "data_batch_1").is_file() or ((root / "train").is_file() and (root / "meta").is_file())


def _native_size(sizes: set[tuple[int, int]]) -> tuple[int | None, str]:
    """(the images' shared square size or None, what their sizes are)."""
    if len(sizes) == 1:
        (width, height), = sizes
        return (width if width == height else None), f"all {width}x{height}"
    smallest, largest = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
    return None, f"{len(sizes)} sizes, {smallest[0]}x{smallest[1]} to {largest[0]}x{largest[1]}"


def _image_files(folder: Path) -> list[tuple[Path, os.stat_result]]:
    """The image files under a class folder (any depth), sorted, with their stat."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            try:
                info = path.stat()
            except FileNotFoundError:  # a dangling symlink
                continue
            if stat.S_ISREG(info.st_mode):
                found.append((path, info))
    return found


def _listing_identity(folder: Path, found: list[tuple[Path, os.stat_result]]) -> list:
    """[count, digest of the file names, digest of names + sizes + modification times] of a class folder:
    enough for --resume to tell a renamed, added or removed file from a replaced or edited one."""
    names, stats = hashlib.sha256(), hashlib.sha256()
    for path, info in found:
        name = os.fsencode(path.relative_to(folder).as_posix())
        names.update(name + b"\0")
        stats.update(name + f"\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
    return [len(found), names.hexdigest()[:16], stats.hexdigest()[:16]]


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


def _read_cifar_batch(path: Path, digests: dict[str, str]) -> dict:
    try:
        content = path.read_bytes()
        batch = _ArrayOnlyUnpickler(io.BytesIO(content), encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - a malformed pickle fails in many ways; any of them means this file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KdcliError(f"cannot read CIFAR batch {path}: {reason}; re-extract the CIFAR archive") from err
    digests[path.name] = hashlib.sha256(content).hexdigest()[:16]
    if not isinstance(batch, dict):
        raise KdcliError(f"CIFAR batch {path} holds a {type(batch).__name__}, not a dict; re-extract the CIFAR archive")
    return {k.decode(errors="replace") if isinstance(k, bytes) else str(k): v for k, v in batch.items()}


def _cifar_arrays(path: Path, batch: dict, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 32, 32, 3] uint8, labels [N]) of one batch, checked: N rows of 3072 bytes, N labels in range."""
    fix = "re-extract the CIFAR archive"
    if "data" not in batch or label_key not in batch:
        raise KdcliError(f"CIFAR batch {path} has no '{'data' if 'data' not in batch else label_key}' entry; {fix}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} array of shape {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise KdcliError(f"CIFAR batch {path}: 'data' is a {what}, not rows of 3072 bytes (32x32x3 uint8); {fix}")
    try:
        labels = np.asarray(batch[label_key])
    except (TypeError, ValueError) as err:
        raise KdcliError(f"CIFAR batch {path}: '{label_key}' is not a list of numbers; {fix}") from err
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise KdcliError(f"CIFAR batch {path}: {len(data)} images but '{label_key}' is not {len(data)} whole numbers; {fix}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise KdcliError(f"CIFAR batch {path}: label {labels.max() if labels.max() >= num_classes else labels.min()} is "
                         f"outside 0..{num_classes - 1} (the meta file names {num_classes} classes); {fix}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def _cifar_source(root: Path) -> DataSource:
    if (root / "data_batch_1").is_file():
        train_files = [root / f"data_batch_{i}" for i in range(1, 6)]
        val_files, label_key, meta, names_key = [root / "test_batch"], "labels", root / "batches.meta", "label_names"
    else:
        train_files, val_files, label_key, meta, names_key = [root / "train"], [root / "test"], "fine_labels", root / "meta", "fine_label_names"
    missing = [p.name for p in [*train_files, *val_files, meta] if not p.is_file()]
    if missing:
        raise KdcliError(f"CIFAR folder {root} is incomplete (missing {', '.join(missing)}); re-extract the archive")
    digests: dict[str, str] = {}
    names = _read_cifar_batch(meta, digests).get(names_key)
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise KdcliError(f"CIFAR meta file {meta} has no list of class names under '{names_key}'; re-extract the archive")
    classes = [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]

    def load(files: list[Path], split: str) -> ArrayImages:
        arrays = [_cifar_arrays(p, _read_cifar_batch(p, digests), label_key, len(classes)) for p in files]
        if not sum(len(labels) for _, labels in arrays):
            raise KdcliError(f"CIFAR folder {root} has no {split} images; re-extract the archive")
        return ArrayImages(np.concatenate([a for a, _ in arrays]), np.concatenate([b for _, b in arrays]))

    train, val = load(train_files, "train"), load(val_files, "test")
    desc = f"CIFAR {root} ({len(train)} train / {len(val)} val, {len(classes)} classes)"
    return DataSource(desc, train, val, classes, native_size=32, identity={"classes": classes, "files": digests})


    return DataSource(desc, train, val, classes, native_size=32, sizes="all 32x32",
                      identity={"classes": classes, "files": digests})


SYNTHETIC_LIMIT = 100_000  # images per split: the generator holds float copies of them all


def _synthetic_source(spec: str) -> DataSource:
    counts = dict(_SYNTHETIC_DEFAULT)
    _, _, args = spec.partition(":")
    for item in filter(None, args.split(",")):
        key, _, value = item.partition("=")
        if key not in counts or not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= SYNTHETIC_LIMIT:
            raise KdcliError(f"--data {spec}: expected synthetic:train=N,val=M with whole numbers from 1 to "
                             f"{SYNTHETIC_LIMIT}")
        counts[key] = int(value)
    train = ArrayImages(*synthetic_images(counts["train"], split_seed=1))
    val = ArrayImages(*synthetic_images(counts["val"], split_seed=2))
    classes = [f"class_{i}" for i in range(SYNTHETIC_CLASSES)]
    desc = f"synthetic ({counts['train']} train / {counts['val']} val, {SYNTHETIC_CLASSES} classes, 32x32)"
    return DataSource(desc, train, val, classes, native_size=SYNTHETIC_SIZE, sizes=f"all {SYNTHETIC_SIZE}x{SYNTHETIC_SIZE}",
                      identity={"synthetic": counts})
