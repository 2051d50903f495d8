"""The errors a user can cause and fix. The CLI turns them into one line and an exit code."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class KdcliError(Exception):
    """Bad input or usage: printed as one line (what is wrong, how to fix it), exit code 2."""

    exit_code = 2


class QualityGateFailed(Exception):
    """A quality gate failed: everything was written, the run exits 1. Carries the report for printing."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class Interrupted(Exception):
    """A signal (SIGINT/SIGTERM) ended the command: exit code 130. resumable: a training state was kept, so the
    line says how to resume."""

    exit_code = 130

    def __init__(self, message: str, resumable: bool = True):
        super().__init__(message)
        self.resumable = resumable


class SignalReceived(BaseException):
    """SIGINT or SIGTERM arrived: raised by kdcli's signal handlers wherever the command is (a BaseException,
    like KeyboardInterrupt, so that no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation failed (torch on CPU raises a RuntimeError, on CUDA an OutOfMemoryError)."""
    text = str(err)
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text))


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean a, b?)' or '' — for messages about unknown names."""
    found = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    return f" (did you mean {', '.join(found)}?)" if found else ""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """text on one line and encodable: control characters (a newline in a file name) as escapes (\\n, \\x1b),
    bytes that are not UTF-8 (a path from a foreign file system, kept by Python as surrogates) as \\xNN."""
    text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def brief(value: object, limit: int = 80) -> str:
    """repr of a value the user gave, cut to `limit` characters: error lines echo input, never all of it."""
    text = printable(repr(value))
    return text if len(text) <= limit else f"{text[: limit - 14]}… ({len(text)} chars)"


def clip(line: str, limit: int = 400) -> str:
    """A line cut in the middle to at most `limit` characters, keeping its start (what) and end (how to fix)."""
    if len(line) <= limit:
        return line
    head, tail = (limit - 3) * 2 // 3, (limit - 3) // 3
    return f"{line[:head]} … {line[-tail:]}"
