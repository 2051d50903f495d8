"""Stored outputs of a frozen source (the teacher, a stage's reference), keyed by view.

Teacher and student must see the same augmented view (Beyer et al. 2022), so outputs are stored per view, not
per image: with `data.views: K` every training image has K fixed views (FKD, Shen & Xing 2022, stores its crops
the same way), and a source's logits (fp16) and the features a stage taps are computed once for all N x K views
when the stage starts, then looked up by (sample, view) in every step. A method cannot tell the difference.

An entry is a folder named by the hash of everything its outputs depend on: the model (type and every weight),
how the student's batch is turned into its input, the training images and labels, the views (seed, K, crop,
flip, size, normalisation) and what is read (taps). A changed teacher or data set gets a new entry; an entry
whose recorded key is not the run's, or whose arrays do not have the expected shape, is refused, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdcli.data import TrainView
from kdcli.data.sources import ArrayImages
from kdcli.errors import KdcliError
from kdcli.models import taps
from kdcli.training.methods import Outputs, Reads
from kdcli.training.precision import MixedPrecision
from kdcli.training.sources import Batch, FrozenModel, Source, identity

FORMAT = 1  # bump when the stored layout or the way views are drawn changes


def default_folder() -> Path:
    """$KDCLI_CACHE_DIR, else $XDG_CACHE_HOME/kdcli/outputs, else ~/.cache/kdcli/outputs."""
    if os.environ.get("KDCLI_CACHE_DIR"):
        return Path(os.environ["KDCLI_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdcli" / "outputs"


def resolve(choice: str, views: int | None) -> Path | None:
    """--cache off|auto|DIR -> the folder to store outputs in, or None. auto stores when the views are fixed
    (data.views, or no random augmentation) and not otherwise: fresh views every epoch are never seen twice."""
    if choice == "off" or (choice == "auto" and views is None):
        return None
    if views is None:
        raise KdcliError(f"--cache {choice}: stored outputs need fixed views; set data.views (e.g. --set "
                         "data.views=8), turn random augmentation off, or pass --cache off")
    folder = default_folder() if choice == "auto" else Path(choice)
    if folder.exists() and not folder.is_dir():
        raise KdcliError(f"--cache {choice}: {folder} is a file; pass a folder, auto or off")
    return folder


def _digest_tensors(digest, tensors: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())


def model_digest(model: nn.Module, prepare) -> str | None:
    """What a frozen model's outputs depend on: its class, structure, weights and input preparation (None when
    the preparation is a function that cannot be hashed)."""
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}".encode())
    _digest_tensors(digest, model.state_dict())
    if isinstance(prepare, nn.Module):
        digest.update(f"{type(prepare).__qualname__}".encode())
        _digest_tensors(digest, prepare.state_dict())
    elif prepare is not identity:
        return None
    return digest.hexdigest()


def data_digest(view: TrainView) -> str:
    """The training images and labels, and how the views are made from them."""
    base = view.base
    digest = hashlib.sha256(json.dumps({
        "format": FORMAT, "seed": view.seed, "views": view.views, "crop": view.crop, "hflip": view.hflip,
        "config": asdict(view.config), "samples": len(base)}, sort_keys=True).encode())
    if isinstance(base, ArrayImages):
        digest.update(np.ascontiguousarray(base.images).tobytes())
        digest.update(np.asarray(base.labels, dtype=np.int64).tobytes())
    else:  # image files: their paths, sizes and modification times, and labels
        for path, label in zip(base.files, base.labels):
            stat = Path(path).stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


class StoredOutputs:
    """A source whose outputs are looked up by (sample, view) in an entry instead of computed; what a checkpoint
    holds of it is the wrapped source's."""

    def __init__(self, source: FrozenModel, view: TrainView, arrays: dict[str, np.ndarray], device: torch.device):
        self.source, self.view, self.arrays, self.device = source, view, arrays, device
        self.name, self.hint = source.name, f"{source.hint} (its outputs were stored: --cache off recomputes them)"

    def outputs(self, batch: Batch, reads: Reads) -> Outputs:
        samples = batch.samples.tolist()
        rows = np.asarray(samples)
        views = np.asarray(self.view.at(batch.stage, batch.epoch).view_ids(samples))

        def look_up(name: str) -> torch.Tensor:
            return torch.from_numpy(self.arrays[name][rows, views]).to(self.device, non_blocking=True).float()

        return Outputs(look_up("logits"), {tap: look_up(f"tap.{tap}") for tap in reads.taps})

    def state(self) -> dict[str, torch.Tensor]:
        return self.source.state()

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.source.load_state(tensors)


@dataclass
class OutputCache:
    """Where entries live and what the run's views are; `wrap` turns a stage's frozen sources into stored ones."""

    folder: Path
    view: TrainView
    device: torch.device
    batch_size: int

    def __post_init__(self):
        self.data = data_digest(self.view)

    def wrap(self, sources: dict[str, Source], needs: Mapping[str, Reads]) -> dict[str, Source]:
        """The stage's sources, each frozen model replaced by its stored outputs (computed now if not stored)."""
        wrapped = dict(sources)
        for name, source in sources.items():
            if isinstance(source, FrozenModel):
                model = model_digest(source.model, source.prepare)
                if model is not None:
                    wrapped[name] = self._stored(source, needs[name], model)
        return wrapped

    def _stored(self, source: FrozenModel, reads: Reads, model: str) -> StoredOutputs:
        key = {"format": FORMAT, "model": model, "data": self.data, "taps": list(reads.taps)}
        entry = self.folder / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        if not entry.is_dir():
            self._compute(source, reads, key, entry)
        return StoredOutputs(source, self.view, self._open(entry, key, reads), self.device)

    def _open(self, entry: Path, key: dict, reads: Reads) -> dict[str, np.ndarray]:
        def refuse(what: str) -> KdcliError:
            return KdcliError(f"stored outputs in {entry} {what}; delete that folder, or pass --cache off")

        try:
            meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise refuse(f"have no readable meta.json ({err})") from err
        if meta.get("key") != key:
            raise refuse("were stored for another model, data set or views than this run's")
        arrays = {}
        for name in ["logits", *(f"tap.{tap}" for tap in reads.taps)]:
            try:
                arrays[name] = np.load(entry / meta["files"][name], mmap_mode="r")
            except (OSError, ValueError, KeyError) as err:
                raise refuse(f"are incomplete ({name}: {err})") from err
            if arrays[name].shape[:2] != (len(self.view), self.view.views):
                raise refuse(f"hold {arrays[name].shape[:2]} (samples, views), not ({len(self.view)}, "
                             f"{self.view.views})")
        return arrays

    def _compute(self, source: FrozenModel, reads: Reads, key: dict, entry: Path) -> None:
        """Every view of every training image through the source, stored as fp16 [N, K, ...] arrays; written to
        a temporary folder renamed into place, so an entry is complete or absent."""
        n, k = len(self.view), self.view.views
        outputs: dict[str, np.ndarray] = {}
        precision = MixedPrecision(self.device)
        for v in range(k):
            for start in range(0, n, self.batch_size):
                samples = list(range(start, min(start + self.batch_size, n)))
                images = self.view.of_views(samples, [v] * len(samples)).to(self.device)
                with torch.no_grad(), precision.autocast():
                    logits, features = taps.forward(source.model, source.prepare(images), reads.taps, source.name)
                for name, value in {"logits": logits, **{f"tap.{t}": f for t, f in features.items()}}.items():
                    if name not in outputs:
                        outputs[name] = np.empty((n, k, *value.shape[1:]), dtype=np.float16)
                    outputs[name][start:start + len(samples), v] = value.float().cpu().numpy()
        tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            files = {}
            for index, (name, array) in enumerate(outputs.items()):
                files[name] = f"{index}.npy"
                np.save(tmp / files[name], array)
            (tmp / "meta.json").write_text(json.dumps({"key": key, "files": files}, indent=1), encoding="utf-8")
            os.replace(tmp, entry)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if entry.is_dir():  # another run stored the same entry meanwhile
                return
            reason = err.strerror or str(err)
            raise KdcliError(f"cannot store outputs in {self.folder}: {reason}; free space, pass another "
                             "--cache DIR, or --cache off") from err
