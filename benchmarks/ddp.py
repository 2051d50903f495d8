"""Training throughput of N processes under torchrun against one process, measured in one run.

    python benchmarks/ddp.py [--arch resnet10t] [--images 2048] [--batch-size 64] [--processes 2]

Runs `kdcli train ARCH --data synthetic:train=IMAGES,...` for 2 epochs three ways: one process with as many
threads as there are cores, one process with one thread, and N processes under torchrun (one thread each, as
torchrun sets it). Throughput is the second epoch's images per second from report.json (the first warms up),
validation included. On a CPU-only machine the N processes share its cores: the ratio shows what DDP costs and
gains there (gradient all-reduce over gloo, data sharding), not what N GPUs give, each with its own device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train(out: Path, arch: str, images: int, batch_size: int, processes: int, threads: int) -> float:
    """Images per second of the second epoch."""
    launcher = [sys.executable, "-m", "kdcli"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                    "-m", "kdcli"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    command = [*launcher, "train", arch, "--data", f"synthetic:train={images},val=64", "--epochs", "2",
               "--set", f"data.batch_size={batch_size}", "--out", str(out)]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    epoch = json.loads((out / "report.json").read_text())["stages"][0]["history"][1]
    return images // batch_size * batch_size / epoch["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet10t")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            f"1 process x {cores} threads": train(Path(tmp, "a"), args.arch, args.images, args.batch_size, 1, cores),
            "1 process x 1 thread": train(Path(tmp, "b"), args.arch, args.images, args.batch_size, 1, 1),
            f"{args.processes} processes x 1 thread": train(Path(tmp, "c"), args.arch, args.images, args.batch_size,
                                                           args.processes, 1),
        }
    print(f"{args.arch}, {args.images} synthetic 32x32 images, global batch {args.batch_size}, {cores} CPU cores; "
          "second epoch, validation included")
    for name, rate in runs.items():
        print(f"  {name:<28} {rate:8.1f} images/s")
    many = runs[f"{args.processes} processes x 1 thread"]
    print(f"  {args.processes} processes / 1 process x 1 thread:       {many / runs['1 process x 1 thread']:.2f}x")
    print(f"  {args.processes} processes / 1 process x {cores} threads: {many / runs[f'1 process x {cores} threads']:.2f}x")


if __name__ == "__main__":
    main()
