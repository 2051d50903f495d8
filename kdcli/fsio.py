"""File writing that never leaves a truncated file behind: write to a temporary name, then rename.

Files get the permissions of any new file (0666 minus the umask), whatever the writer library chose for its
temporary file, so a student copied into a container or read by another account is readable."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from kdcli.errors import KdcliError


def _umask() -> int:
    with open("/proc/self/status", encoding="ascii", errors="replace") as status:  # Linux: read without changing it
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise OSError("no Umask line")


def file_mode() -> int:
    """The mode a new file gets here: 0666 minus the process's umask."""
    try:
        umask = _umask()
    except OSError:  # not Linux: os.umask only sets, so set it back at once
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) and move tmp onto path; on any failure path is untouched and tmp removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error type
        tmp.unlink(missing_ok=True)
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise KdcliError(f"cannot write {path}: {reason}; free space or choose another --out") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def encodable(text: str) -> str:
    """text with bytes that are not UTF-8 (kept by Python as lone surrogates) written as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def strict(data: object) -> object:
    """data made strict JSON: NaN and infinities become null, strings encodable."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, str):
        return encodable(data)
    if isinstance(data, dict):
        return {encodable(k) if isinstance(k, str) else k: strict(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict(v) for v in data]
    return data


def json_text(data: object) -> str:
    """Strict JSON (no NaN tokens, no lone surrogates), indented, with a final newline."""
    return json.dumps(strict(data), indent=2, allow_nan=False) + "\n"


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(encodable(text), encoding="utf-8"))


def write_json(path: Path, data: object) -> None:
    write_text(path, json_text(data))
