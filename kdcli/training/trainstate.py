"""Training checkpoints: one safetensors file holding every tensor (student, reference, connectors, optimizer
moments, RNG) with everything else as JSON in its metadata. Written atomically; read without pickle."""

from __future__ import annotations

import hashlib
import json
import signal
from contextlib import contextmanager
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from kdcli.errors import KdcliError, SignalReceived, brief
from kdcli.fsio import atomic_write

CHECKPOINT_NAME = "checkpoint.safetensors"
STATE_KEY = "kdcli_state"
_TENSOR, _INT_KEYS = "__tensor__", "__int_keys__"


def split_tensors(obj, prefix: str, tensors: dict[str, torch.Tensor]):
    """A JSON-able copy of obj with every tensor moved into `tensors` (key left behind as a placeholder).
    Dicts with int keys (optimizer state) are kept as pairs so the keys come back as ints."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: prefix}
    if isinstance(obj, dict):
        if any(not isinstance(k, str) for k in obj):
            return {_INT_KEYS: [[k, split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
        return {k: split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def join_tensors(obj, tensors: dict[str, torch.Tensor]):
    """Inverse of split_tensors."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_INT_KEYS}:
            return {k: join_tensors(v, tensors) for k, v in obj[_INT_KEYS]}
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def module_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def load_module(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    start = f"{prefix}."
    module.load_state_dict({k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}, strict=True)


def rng_tensors() -> dict[str, torch.Tensor]:
    found = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        found.update({f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return found


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    metadata = {STATE_KEY: json.dumps(state)}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            state = json.loads((handle.metadata() or {})[STATE_KEY])
        tensors = safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError, KeyError, ValueError) as err:
        raise KdcliError(f"checkpoint {path} is unreadable ({err}); start afresh with --force instead of --resume") from err
    if not isinstance(state, dict):
        raise KdcliError(f"checkpoint {path} is damaged (its state is not a JSON object); start afresh with --force "
                         "instead of --resume")
    return tensors, state


@contextmanager
def restoring(path: Path):
    """Around putting saved state back into models and optimizers: what a damaged file makes them raise
    (a missing or misshapen tensor, a malformed structure) becomes a clear error naming the file."""
    try:
        yield
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise KdcliError(f"checkpoint {path} is damaged ({reason}); start afresh with --force instead of --resume") from err


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def first_difference(saved, now, path: str = "") -> str | None:
    """'stages.1.epochs: 3 in the interrupted run, 4 now' for the first place two JSON values differ."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in [*saved, *(k for k in now if k not in saved)]:
            found = first_difference(saved.get(key), now.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        for i, (a, b) in enumerate(zip(saved, now)):
            found = first_difference(a, b, f"{path}.{i}" if path else str(i))
            if found:
                return found
        return None
    return None if saved == now else f"{path or 'value'}: {brief(saved)} in the interrupted run, {brief(now)} now"


class StopSignals:
    """While active, SIGINT/SIGTERM ask training to stop at the next step, after saving a checkpoint.
    A second signal interrupts at once (files are still never half-written: every write is atomic)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.received is not None:
            raise SignalReceived(signum)
        self.received = signum

    def requested(self) -> bool:
        return self.received is not None
