"""Several processes under torchrun: one process group, each process's share of the data, one writer, and
agreement on how the command ends.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) starts one kdcli
per GPU; `join()` puts them in torch's process group: nccl for CUDA tensors, gloo for CPU ones. Without those
variables (or with WORLD_SIZE=1) every function here is the one-process identity, so one code path serves both.

Agreement. A process enters a collective (the gradients' all-reduce, a gather, a broadcast) only after every
process has said it is healthy: `check()` is an all-reduce of [failed, stop] flags. A process that fails anywhere
goes straight to the command's end, where `conclude()` joins that same all-reduce with failed=1; then every
process takes the line and exit code of the lowest failed rank and ends with them. So an error on one rank ends
all ranks with one line and one exit code, and none waits on a collective a failed peer will never join. What
cannot be agreed on (a process killed outright, a crash inside a collective) ends in the group's TIMEOUT.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from kdcli.errors import KdcliError

TIMEOUT = timedelta(minutes=30)  # the longest any process waits on another (rank 0 writing a checkpoint included)
COMMANDS = ("distill", "train", "eval")  # what runs on several processes; the rest would write N times


class PeerFailed(Exception):
    """Another process failed: end as it ended (`ending`: how exits.py words an ending, its exit code last)."""

    def __init__(self, ending: tuple):
        super().__init__(ending)
        self.ending = ending


class _Group:
    rank, world, local_rank = 0, 1, 0
    settled = False  # a failure was agreed on: the command's end joins no further collective


_group = _Group()


def rank() -> int:
    return _group.rank


def world_size() -> int:
    return _group.world


def is_writer() -> bool:
    """Rank 0 writes every file (checkpoints, the student, reports) and prints; the others write nothing."""
    return _group.rank == 0


def describe() -> dict:
    return {"processes": _group.world, "backend": dist.get_backend() if _group.world > 1 else None}


def join(command: str | None) -> None:
    """Join the process group torchrun's environment describes, if it describes more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    if command not in COMMANDS:
        raise KdcliError(f"kdcli {command or ''} runs in one process; run it without torchrun "
                         f"(under torchrun: {', '.join(COMMANDS)})")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise KdcliError(f"LOCAL_RANK {local_rank}, but this node has {torch.cuda.device_count()} CUDA devices; "
                             "start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as err:  # no rendezvous: a wrong address, port or environment
        reason = " ".join(str(err).split())[:200]
        raise KdcliError(f"cannot join the group of {world} processes ({reason}); start kdcli with torchrun, "
                         "or check MASTER_ADDR/MASTER_PORT (--rdzv-endpoint)") from err
    _group.rank, _group.world, _group.local_rank = dist.get_rank(), dist.get_world_size(), local_rank


def leave() -> None:
    """Wait until every process is here (each has printed its last line), then leave the group."""
    if _group.world <= 1:
        return
    with contextlib.suppress(RuntimeError):  # a peer already gone: nothing to wait for
        dist.barrier()
    dist.destroy_process_group()
    _group.rank, _group.world, _group.settled = 0, 1, False


@contextlib.contextmanager
def quiet():
    """Processes other than the writer print nothing while the command runs (their last line comes after)."""
    if is_writer():
        yield
        return
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    sink = os.open(os.devnull, os.O_WRONLY)
    try:  # the file descriptors too: torch's C++ warnings do not go through sys.stderr
        os.dup2(sink, 1), os.dup2(sink, 2)
        with open(os.devnull, "w") as quiet_sink, contextlib.redirect_stdout(quiet_sink), \
                contextlib.redirect_stderr(quiet_sink):
            yield
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in (*saved, sink):
            os.close(fd)


def _flags(failed: bool, stop: bool) -> tuple[int, int]:
    flags = torch.tensor([int(failed), int(stop)], dtype=torch.int64)
    dist.all_reduce(flags)
    return int(flags[0]), int(flags[1])


def _agreed_failure(own: tuple | None) -> tuple:
    """The ending of the lowest failed rank, on every process."""
    lowest = torch.tensor([_group.rank if own is not None else _group.world], dtype=torch.int64)
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    payload = [own]
    dist.broadcast_object_list(payload, src=int(lowest))
    _group.settled = True
    return payload[0]


def check(stop: bool = False) -> bool:
    """Every process is healthy (else PeerFailed); returns whether any process asked to stop."""
    if _group.world <= 1:
        return stop
    failed, stops = _flags(False, stop)
    if failed:
        raise PeerFailed(_agreed_failure(None))
    return stops > 0


def conclude(ending: tuple, failed: bool) -> tuple:
    """How the command ends, the same on every process: its own ending if all succeeded, else the lowest failed
    rank's (a picklable tuple: the line to print and the exit code)."""
    if _group.world <= 1 or _group.settled:
        return ending
    try:
        any_failed, _ = _flags(failed, False)
        return _agreed_failure(ending if failed else None) if any_failed else ending
    except RuntimeError:  # a peer is gone (killed, or crashed inside a collective): say our own ending
        return ending


def share(batch: list[int]) -> list[int]:
    """This process's contiguous share of a global batch (its size is a multiple of the processes)."""
    size = len(batch) // _group.world
    return batch[_group.rank * size:(_group.rank + 1) * size]


def shard(count: int) -> range:
    """This process's contiguous block of `count` evaluation samples; the blocks, in rank order, are all of them."""
    return range(count * _group.rank // _group.world, count * (_group.rank + 1) // _group.world)


def gather(value) -> list:
    """Every process's value, in rank order (a picklable object: tensors are sent whole, nothing padded)."""
    if _group.world <= 1:
        return [value]
    check()
    found = [None] * _group.world
    dist.all_gather_object(found, value)
    return found


def sum_all(values: list[float]) -> list[float]:
    """Element-wise sums over the processes."""
    if _group.world <= 1:
        return values
    check()
    summed = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(summed)
    return summed.tolist()


def average_buffers(modules: list[nn.Module]) -> None:
    """Average the floating-point buffers (batch-norm statistics) over the processes, as timm's distribute_bn
    'reduce' does: each process gathered its statistics from its own share of the data."""
    buffers = [b for m in modules for b in m.buffers() if b.is_floating_point()]
    if _group.world <= 1 or not buffers:
        return
    check()
    for buffer in buffers:
        dist.all_reduce(buffer)
        buffer.div_(_group.world)


def from_writer(make):
    """make() run by the writer alone and its result sent to every process (a checkpoint read once, so that only
    rank 0 needs the output folder)."""
    if _group.world <= 1:
        return make()
    value = make() if is_writer() else None
    check()
    payload = [value]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def wrap(module: nn.Module) -> nn.Module:
    """DistributedDataParallel around what trains. A static graph: a stage's step uses the same parameters every
    time, and parameters it never uses (a student read only up to a tap) are found in its first step. Buffers
    are averaged per epoch (average_buffers), not sent from rank 0 every step."""
    if _group.world <= 1:
        return module
    check()
    ddp = nn.parallel.DistributedDataParallel
    # torch >= 2.10 renamed broadcast_buffers (deprecated there) to forward_sync_buffers
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    return ddp(module, static_graph=True, **{no_sync: False})
