"""Shared fixtures: the real CLI run in-process, and a tiny teacher trained once per session."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from kdcli.cli import main

# Speed is timed until the median settles; on a busy test machine it may not, so bound the time spent timing
# (subprocesses inherit it). Tests assert the shape and logic of timings, never their values.
os.environ.setdefault("KDCLI_TIMING_SECONDS", "1")

# Tiny but real: timm test architectures on a small synthetic split, at 32x32.
DATA = "synthetic:train=256,val=128"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


@pytest.fixture
def cli(capsys):
    """Run `kdcli ARGS` in this process; returns exit code, stdout, stderr."""

    def run(*args: str | Path) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A test_resnet teacher trained for 2 epochs with `kdcli train` (timm layout folder)."""
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    assert main(["train", "test_resnet", "--data", DATA, "--out", str(out), "--epochs", "2"]) == 0
    return out
