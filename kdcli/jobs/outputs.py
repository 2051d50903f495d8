"""Outputs that appear all at once or not at all, and one command at a time on an --out folder.

For `--out DIR` a command works in a hidden sibling folder, `.DIR.kdcli/`:

  lock         locked (flock) by the running command and holding its pid; the kernel releases it on any exit,
               so a lock left by a dead process is simply taken over
  partial/     what the command writes. DIR appears, or replaces the previous DIR, in one rename when the
               command succeeds. A training run keeps its checkpoint and recipe.yaml here: --resume finds them.
  replaced/    the previous DIR during the instant of that swap
  superseded/  an interrupted run's partial/ while a --force run starts over, until the new run can resume

When a command fails, partial/ is removed, unless it holds a training state to resume: then only that state
stays. Whatever a crash leaves (even SIGKILL) is put right by the next command on the same --out.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from kdcli.data.sources import is_synthetic
from kdcli.errors import Interrupted, KdcliError, SignalReceived
from kdcli.fsio import file_mode
from kdcli.training.trainstate import CHECKPOINT_NAME

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

RECIPE_NAME = "recipe.yaml"
RESUMABLE = (CHECKPOINT_NAME, RECIPE_NAME)  # what a stopped training run keeps in partial/
MARKS = ("report.json", "model.safetensors", CHECKPOINT_NAME)  # a folder holding one of these is a kdcli output

_final: dict[Path, Path] = {}  # partial folders of the commands running in this process -> their --out


def public(path: Path | str) -> Path:
    """Where a path inside a partial folder will be once its command succeeds: what reports should name."""
    path = Path(path)
    for partial, out in reversed(_final.items()):  # innermost first: the demo stages runs inside its own
        if path == partial or partial in path.parents:
            path = out / path.relative_to(partial)
    return path


class Outputs:
    """`with Outputs(out, ...) as outputs:` write into outputs.folder; on success it becomes `out`.

    force: replace a previous kdcli output (only when this command succeeds), or discard an interrupted run.
    resume: continue the interrupted run whose state is in partial/.
    data, inputs ({role: path}): what the command reads; --out may not hold them or lie inside the data,
    except the roles in in_place (a fine-tune that replaces its own starting folder)."""

    def __init__(self, out: Path, *, force: bool = False, resume: bool = False, data: str | None = None,
                 inputs: dict[str, str | None] | None = None, in_place: tuple[str, ...] = (), phase: str = "working"):
        self.given = Path(out)
        out = Path(os.path.normpath(out))
        if out.name in ("", ".."):
            out = Path(os.path.abspath(out))
        if out.is_symlink():  # replace what it points to, not the link
            out = Path(os.path.realpath(out))
        self.out = out
        self.force, self.resume, self.data = force, resume, data
        self.inputs, self.in_place, self.phase = inputs or {}, in_place, phase
        self.home = out.parent / f".{out.name}.kdcli"
        self.folder = self.home / "partial"
        self._fd: int | None = None
        self._created: list[Path] = []

    # ------------------------------------------------------------------ the command's lifetime

    def __enter__(self) -> Outputs:
        self._check_target()
        try:
            self._make_home()
            self._lock()
            self._recover()
            self._check_contents()
            self._begin()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, kind, error, _traceback) -> None:
        try:
            if kind is None:
                self._commit()
            else:
                self._abort()
        finally:
            self._release()
        if kind is not None and issubclass(kind, (SignalReceived, KeyboardInterrupt, Interrupted)):
            if self.resumable and issubclass(kind, Interrupted):
                return  # the training loop stopped and says where
            kept = f"the training state is kept in {self.folder}" if self.resumable else f"nothing was written to {self.given}"
            how = f" by {signal.Signals(error.signum).name}" if isinstance(error, SignalReceived) else ""
            raise Interrupted(f"interrupted{how} while {self.phase}; {kept}", resumable=self.resumable) from None

    @property
    def resumable(self) -> bool:
        return _resumable(self.folder)

    # ------------------------------------------------------------------ checks

    def _check_target(self) -> None:
        out, given = self.out, self.given
        if out == out.parent:
            raise KdcliError(f"--out {given} is the root of the file system; pass a folder below it")
        if out.exists() and not out.is_dir():
            raise KdcliError(f"--out {given} is a file; pass a folder")
        if out.is_dir() and os.path.ismount(out):
            raise KdcliError(f"--out {given} is a mount point, which kdcli cannot replace in one rename; "
                             f"pass a folder inside it, e.g. --out {given / 'run'}")
        real = Path(os.path.realpath(out))
        if self.data and not is_synthetic(self.data) and Path(self.data).exists():
            data = Path(os.path.realpath(self.data))
            if _within(real, data):
                raise KdcliError(f"--out {given} is inside --data {self.data}: a later run would read its files as "
                                 "data; choose a folder outside the data")
            if _within(data, real):
                raise KdcliError(f"--out {given} holds --data {self.data}; choose a folder outside the data")
        for role, ref in self.inputs.items():
            if ref and role not in self.in_place and Path(ref).exists() and _within(Path(os.path.realpath(ref)), real):
                raise KdcliError(f"--out {given} holds the {role} {ref}, which writing the outputs would replace; "
                                 "choose another folder")

    def _check_contents(self) -> None:
        given, partial = self.given, self.folder
        if self.resume:
            if not self.resumable:
                reason = "it holds a finished run" if (self.out / "report.json").is_file() else "there is no checkpoint"
                raise KdcliError(f"nothing to resume in {given}: {reason}; drop --resume to start a run")
            return
        if self.resumable and not self.force:
            raise KdcliError(f"--out {given} has an interrupted run (its state is in {partial}); pass --resume to "
                             "continue it, or --force to start afresh")
        if self.out.is_dir() and any(self.out.iterdir()):
            if not _made_by_kdcli(self.out):
                names = ", ".join(sorted(p.name for p in self.out.iterdir())[:3])
                raise KdcliError(f"--out {given} is not empty and holds files kdcli did not write ({names}); choose a "
                                 "new folder (--force replaces only a folder kdcli wrote)")
            if not self.force:
                raise KdcliError(f"--out {given} is not empty; pass --force to replace it, or choose a new folder")

    # ------------------------------------------------------------------ the folders

    def _make_home(self) -> None:
        missing = [p for p in (self.home, *self.home.parents) if not p.exists()][::-1]
        for folder in missing:
            try:
                os.mkdir(folder)
            except FileExistsError:
                continue
            except OSError as err:
                where = folder.parent if folder.parent.exists() else folder
                raise KdcliError(f"--out {self.given}: cannot write in {where} ({err.strerror}); choose another "
                                 "folder") from err
            self._created.append(folder)

    def _lock(self) -> None:
        if fcntl is None:
            return
        path = self.home / "lock"
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
            except FileNotFoundError:  # the previous holder removed the folder just now
                self._make_home()
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return  # a file system without locks: go on unlocked
                raise KdcliError(f"--out {self.given} is in use by another kdcli run ({_holder(holder)}); wait for "
                                 "it to finish, or choose another --out") from None
            try:  # the holder before us may have removed the file between our open and lock: lock the one there
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _recover(self) -> None:
        """Put right what a command killed on this --out left behind (we hold the lock: nobody else is here)."""
        replaced, superseded = self.home / "replaced", self.home / "superseded"
        if replaced.exists():  # killed in the middle of the swap
            if self.out.exists():
                shutil.rmtree(replaced)
            else:
                os.rename(replaced, self.out)
        if superseded.exists():  # a --force run killed before it could be resumed gives the older run back
            if self.resumable:
                shutil.rmtree(superseded)
            else:
                shutil.rmtree(self.folder, ignore_errors=True)
                os.rename(superseded, self.folder)
        if self.folder.exists() and not self.resumable:  # a command killed before it had anything to resume
            shutil.rmtree(self.folder)

    def _begin(self) -> None:
        if not self.resume:
            if self.folder.exists():  # an interrupted run that --force starts over: kept until this one can resume
                os.rename(self.folder, self.home / "superseded")
            os.mkdir(self.folder)
        _final[self.folder] = self.out

    def _commit(self) -> None:
        """Move partial/ into place as --out, replacing the previous --out, in as few renames as the OS allows."""
        replaced = self.home / "replaced"
        with deferred_signals():
            (self.folder / CHECKPOINT_NAME).unlink(missing_ok=True)  # the run is complete: no state to resume
            if self.out.is_dir():
                if any(self.out.iterdir()):
                    os.rename(self.out, replaced)
                else:
                    os.rmdir(self.out)
            try:
                os.rename(self.folder, self.out)
            except OSError as err:
                if replaced.exists():
                    os.rename(replaced, self.out)
                raise KdcliError(f"cannot move the outputs into {self.given} ({err.strerror}); they are in "
                                 f"{self.folder}") from err
            shutil.rmtree(replaced, ignore_errors=True)
            shutil.rmtree(self.home / "superseded", ignore_errors=True)

    def _abort(self) -> None:
        superseded = self.home / "superseded"
        if self.resumable:
            for entry in self.folder.iterdir():
                if entry.name not in RESUMABLE:
                    _remove(entry)
            shutil.rmtree(superseded, ignore_errors=True)
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        if superseded.exists():
            os.rename(superseded, self.folder)

    def _release(self) -> None:
        _final.pop(self.folder, None)
        if self._fd is not None:
            (self.home / "lock").unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        for folder in dict.fromkeys([self.home, *reversed(self._created)]):  # innermost first
            try:
                os.rmdir(folder)  # only when empty: a resumable state, or the outputs' parents, stay
            except FileNotFoundError:
                continue
            except OSError:
                break


def _holder(pid: str) -> str:
    if not pid.isdigit():
        return "a process that is starting"
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:  # its data-loader workers, which share the lock, have not noticed yet
        return f"pid {pid}, which has ended; its worker processes are still exiting, retry in a few seconds"
    except OSError:
        pass
    return f"pid {pid}"


def _resumable(partial: Path) -> bool:
    return (partial / CHECKPOINT_NAME).is_file()


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _made_by_kdcli(folder: Path, depth: int = 1) -> bool:
    """A previous kdcli output: a run, an eval report, a converted model, or (depth 1) a demo's folder of runs."""
    entries = list(folder.iterdir())
    if any(entry.name in MARKS and entry.is_file() for entry in entries):
        return True
    return depth > 0 and bool(entries) and all(e.is_dir() and _made_by_kdcli(e, depth - 1) for e in entries)


@contextmanager
def deferred_signals():
    """SIGINT and SIGTERM wait until the block is done; they are delivered right after it."""
    stops = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    except (AttributeError, OSError, ValueError):  # no pthread_sigmask here
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
