"""Shared fixtures: the real CLI run in-process, and a tiny teacher trained once per session."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from kdcli.cli import main

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


# ---------------------------------------------------------------- kdcli in a subprocess, waited on by progress

STALL = 900  # seconds without a printed line before a subprocess counts as hung: generous, for busy machines


class Watched:
    """`kdcli ARGS` in a subprocess whose output is read as it comes. Waits end on progress (a line printed, a
    condition met), never on a wall-clock budget: only a process silent for STALL seconds fails a test."""

    def __init__(self, args: list, env: dict | None = None, preexec_fn=None):
        import subprocess
        import threading
        import time

        self._time = time.monotonic
        self.process = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env, preexec_fn=preexec_fn)
        self.lines = {"out": [], "err": []}
        self.last = self._time()
        self._readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((self.process.stdout, "out"), (self.process.stderr, "err"))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self.lines[name].append(line)
            self.last = self._time()

    def wait_until(self, condition, stall: float = STALL) -> bool:
        """True once condition() holds; False if the process ended first. Fails the test if it hangs."""
        import time

        while not condition():
            if self.process.poll() is not None:
                return bool(condition())
            if self._time() - self.last > stall:
                self.process.kill()
                pytest.fail(f"no output for {stall} s: {' '.join(self.process.args)}\n{self.err}")
            time.sleep(0.02)
        return True

    def finish(self, stall: float = STALL) -> Result:
        self.wait_until(lambda: self.process.poll() is not None, stall)
        for reader in self._readers:
            reader.join()
        return Result(self.process.returncode, self.out, self.err)

    @property
    def out(self) -> str:
        return "".join(self.lines["out"])

    @property
    def err(self) -> str:
        return "".join(self.lines["err"])


def run_kdcli(*args, env: dict | None = None, preexec_fn=None, stall: float = STALL) -> Result:
    """`python -m kdcli ARGS` to its end, as long as it keeps printing progress."""
    import sys

    return Watched([sys.executable, "-m", "kdcli", *args], env=env, preexec_fn=preexec_fn).finish(stall)


def partial_of(out: Path) -> Path:
    """Where a command on --out keeps its files until it succeeds, and an interrupted training run its checkpoint
    (kdcli/jobs/outputs.py)."""
    return out.parent / f".{out.name}.kdcli" / "partial"
