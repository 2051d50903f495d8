"""The options several commands share, and turning their values into what the jobs take."""

from __future__ import annotations

import typer

from kdcli.errors import KdcliError

DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda")
CHANNELS_LAST = typer.Option(False, "--channels-last", help="train convolutional models in NHWC memory layout "
                             "(often faster; the written student is in timm's usual layout)")
PRECISION = typer.Option("auto", "--precision", help="training arithmetic: auto (CUDA: bf16 where the GPU has it, "
                         "else fp16; CPU: fp32), fp32, or bf16 (on CPU too: faster where the CPU has bf16 "
                         "instructions)")
SET = typer.Option(None, "--set", help="override a recipe field: dotted.path=value (repeatable)")
JSON = typer.Option(False, "--json", help="print the machine-readable result to stdout, nothing else")


def size_option(prefix: str, whose: str):
    return typer.Option(None, f"--{prefix}image-size", help=f"{whose} input size [default: its config, else the data's native size]")


def mean_option(prefix: str, whose: str):
    return typer.Option(None, f"--{prefix}mean", help=f"{whose} normalisation mean, R,G,B [default: its config, else timm's]")


def std_option(prefix: str, whose: str):
    return typer.Option(None, f"--{prefix}std", help=f"{whose} normalisation std, R,G,B [default: its config, else timm's]")


def interp_option(prefix: str, whose: str):
    return typer.Option(None, f"--{prefix}interpolation", help=f"{whose} resize interpolation: bilinear, bicubic, ...")


RESET_HEAD = typer.Option(False, "--reset-head", help="start the student from a checkpoint of other classes: keep its "
                          "backbone, new head (automatic for Hub and pretrained names)")
DRY_RUN = typer.Option(False, "--dry-run", help="print the resolved plan (models, init, preprocessing, steps, time) and exit")


def flags(prefix: str, image_size, mean, std, interpolation):
    from kdcli.models.preprocessing import preprocessing_flags

    return preprocessing_flags(prefix, image_size, mean, std, interpolation)


BASELINE = typer.Option(None, "--baseline", help="a baseline checkpoint (e.g. the student trained without KD) to compare with")
BASELINE_ARCH = typer.Option(None, "--baseline-arch", help="baseline architecture, if its weights do not say")
WORKERS = typer.Option(None, "--workers", help="data loader worker processes, or auto (none when the images "
                       "are decoded in memory) [default: the recipe's data.workers, auto]")
MIN_TOP1 = typer.Option(None, "--min-top1", help="quality gate: exit 1 when student top-1 (%) is below this")
MAX_DROP = typer.Option(None, "--max-drop", help="quality gate: exit 1 when teacher top-1 - student top-1 exceeds these points")
LOG = typer.Option(None, "--log", help="also log to: tensorboard (needs pip install 'kdcli[tensorboard]'); "
                   "metrics.jsonl and metrics.csv are always written, one row per epoch")
FORCE = typer.Option(False, "--force", help="write into a non-empty --out")


MORE_TEACHERS = typer.Option(None, "--teacher", help="another teacher (repeatable): the teachers' logits are "
                             "averaged; feature and relation losses tap TEACHER unless they say teacher: N")
TEACHER_WEIGHTS = typer.Option(None, "--teacher-weights", help="weights of the teachers' logits, TEACHER first, e.g. "
                               "0.5,0.5 [default: equal]")
INIT_FROM_TEACHER = typer.Option(False, "--init-from-teacher", help="start the student from the teacher's weights: "
                                 "every other block, stem and head where shapes fit (same family, fewer blocks)")


def workers(value: str | None) -> int | str | None:
    """--workers N|auto."""
    if value is None or value == "auto":
        return value
    if not value.isdigit():
        raise KdcliError(f"--workers {value}: expected a number of worker processes (0 or more) or auto")
    return int(value)


def weights(text: str | None, teachers: int) -> list[float] | None:
    if text is None:
        return None
    from kdcli.training.sources import parse_teacher_weights

    return parse_teacher_weights(text, teachers)
