"""File writing that never leaves a truncated file behind: write to a temporary name, then rename."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from kdcli.errors import KdcliError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) and move tmp onto path; on any failure path is untouched and tmp removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error type
        tmp.unlink(missing_ok=True)
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise KdcliError(f"cannot write {path}: {reason}; free space or choose another --out") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
