"""The errors a user can cause and fix. The CLI turns them into one line and an exit code."""

from __future__ import annotations

import difflib
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
    """Training stopped on SIGINT/SIGTERM after saving its state: exit code 130, with how to resume."""

    exit_code = 130


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean a, b?)' or '' — for messages about unknown names."""
    found = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    return f" (did you mean {', '.join(found)}?)" if found else ""
