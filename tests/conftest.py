"""Shared fixtures: the real CLI run in-process, a tiny teacher trained once per session, and a local Hugging Face
Hub cache (tests never touch the network)."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# huggingface_hub reads these once, when it is first imported: set them before anything imports it.
HF_HOME = Path(tempfile.mkdtemp(prefix="kdcli-test-hf-"))
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)
os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(HF_HOME), HF_HUB_CACHE=str(HF_HOME / "hub"))
os.environ["KDCLI_CACHE_DIR"] = str(HF_HOME / "kdcli-outputs")  # --cache auto never writes in the user's home

import pytest  # noqa: E402

from kdcli.cli import main  # noqa: E402

# Speed is timed until the median settles; on a busy test machine it may not, so bound the time spent timing
# (subprocesses inherit it). Tests assert the shape and logic of timings, never their values.
os.environ.setdefault("KDCLI_TIMING_SECONDS", "1")

# Tiny but real: timm test architectures on a small synthetic split, at 32x32.
DATA = "synthetic:train=256,val=128"
# The session teacher trains on a bigger train split (the same val split as DATA) so that it is clearly above
# chance (about 41% top-1 against 27% needed on these 128 images): kdcli refuses teachers at chance.
TEACHER_DATA = "synthetic:train=2048,val=128"


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
    """A test_resnet teacher trained for 3 epochs with `kdcli train` (timm layout folder)."""
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    args = ["train", "test_resnet", "--data", TEACHER_DATA, "--out", str(out), "--epochs", "3", "--set", "optimizer.lr=0.1"]
    assert main(args) == 0
    return out


def put_in_hub_cache(repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Lay a folder's files out in the Hub cache as huggingface_hub lays a download out: blobs named by their etag
    (sha256 for LFS files, the git blob sha1 for the rest), snapshots/<commit>/<file> linking to them, and
    refs/<revision> naming the commit. Returns the snapshot folder."""
    repo = HF_HOME / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        if file.suffix in (".safetensors", ".bin"):  # stored with git LFS on the Hub
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / etag).write_bytes(data)
        link = snapshot / file.name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..", "..", "blobs", etag))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
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
