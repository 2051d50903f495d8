"""The command line: parse, call the library, print. No training logic here."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from kdcli import __version__
from kdcli import clioptions as opt
from kdcli.clihelp import Command, Group, examples
from kdcli.clirecipe import recipe_app
from kdcli.clioptions import (
    BASELINE, BASELINE_ARCH, DEVICE, DRY_RUN, FORCE, INIT_FROM_TEACHER, JSON, LOG, MAX_DROP, MIN_TOP1, MORE_TEACHERS,
    CHANNELS_LAST, PRECISION, RESET_HEAD, SET, TEACHER_WEIGHTS, WORKERS,
)
from kdcli.errors import KdcliError, QualityGateFailed, printable
from kdcli.exits import err_console, run

app = typer.Typer(
    name="kdcli",
    help="Compress timm image classifiers by sequential multi-stage knowledge distillation.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=Group,
    rich_markup_mode="markdown",
)
app.add_typer(recipe_app, name="recipe")


def _version(value: bool) -> None:
    if value:
        print(f"kdcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks (also accepted after any command)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress, run plan or notes on stderr; errors, warnings "
                               "and the result only (also accepted after any command)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="more progress: in logs, a line about every tenth of "
                                 "an epoch (loss, img/s, ETA) (also accepted after any command)"),
) -> None:
    """kdcli: teacher.safetensors + a timm student name -> a smaller student, timm-native, with a report."""


VERBOSITY = {"-q": -1, "--quiet": -1, "-v": 1, "--verbose": 1}
verbosity = 0  # set by main() from -q/--quiet or -v/--verbose anywhere on the command line


def _progress(label: str = ""):
    from kdcli.progress import progress_for_terminal

    return progress_for_terminal(label, verbosity)


def _print_json(data: dict) -> None:
    """Strict JSON on stdout: no NaN tokens (null instead), nothing a strict parser rejects."""
    from kdcli.fsio import json_text

    sys.stdout.write(json_text(data))


def _finish(job):
    """Run a job; a failed quality gate still returns its report, with the failure to raise after printing."""
    try:
        return job(), None
    except QualityGateFailed as failed:
        return failed.report, failed


def _show(report: dict, failed: QualityGateFailed | None, json_: bool, print_text) -> None:
    _print_json(report) if json_ else print_text()
    for role in ("student", "teacher", "baseline"):
        if isinstance(report.get(role), dict) and report[role].get("non_finite_outputs"):
            err_console.print(f"warning: the {role}'s outputs are not finite (NaN or infinite) on "
                              f"{report[role]['non_finite_outputs']} of {report['evaluation']['samples']} validation "
                              "images; its accuracy metrics are null", markup=False, soft_wrap=True)
    if failed is not None:
        raise failed


def _plan_shower():
    from kdcli.display import print_plan

    return None if verbosity < 0 else lambda plan: print_plan(plan, stderr=True)


def _dry_run(plan: dict, json_: bool) -> None:
    from kdcli.display import print_plan

    _print_json({"plan": plan}) if json_ else print_plan(plan)


@app.command(cls=Command, epilog=examples("distill"))
def distill(
    teacher: str = typer.Argument(..., help="teacher: a .safetensors file, a timm folder, hf-hub:ORG/NAME or ARCH.TAG"),
    student: str = typer.Argument(..., help="student: a timm architecture (random init), ARCH.TAG or hf-hub:ORG/NAME "
                                  "(pretrained), or a .safetensors/folder to start from"),
    data: str = typer.Option(..., "--data", "-d", help="ImageFolder root (train/, val/), CIFAR python folder, or 'synthetic'"),
    recipe: str = typer.Option(None, "--recipe", "-r", help="built-in recipe name or YAML file [default: joint]"),
    out: Path = typer.Option(Path("kdcli-distill"), "--out", "-o", help="output folder"),
    set_: list[str] = SET,
    seed: int = typer.Option(None, "--seed", help="overrides the recipe's seed"),
    teacher_arch: str = typer.Option(None, "--teacher-arch", help="teacher architecture, if the weights do not say"),
    student_arch: str = typer.Option(None, "--student-arch", help="student architecture, if its weights do not say"),
    teacher_image_size: int = opt.size_option("teacher-", "the teacher's"),
    teacher_mean: str = opt.mean_option("teacher-", "the teacher's"),
    teacher_std: str = opt.std_option("teacher-", "the teacher's"),
    teacher_interpolation: str = opt.interp_option("teacher-", "the teacher's"),
    image_size: int = opt.size_option("", "the student's (overrides the recipe's data.image_size);"),
    mean: str = opt.mean_option("", "the student's"),
    std: str = opt.std_option("", "the student's"),
    interpolation: str = opt.interp_option("", "the student's"),
    reset_head: bool = RESET_HEAD,
    more_teachers: list[str] = MORE_TEACHERS,
    teacher_weights: str = TEACHER_WEIGHTS,
    init_from_teacher: bool = INIT_FROM_TEACHER,
    allow_weak_teacher: bool = typer.Option(False, "--allow-weak-teacher", help="train even if the teacher scores "
                                            "at chance on the validation split or its label names differ"),
    device: str = DEVICE,
    precision: str = PRECISION,
    channels_last: bool = CHANNELS_LAST,
    force: bool = FORCE,
    resume: bool = typer.Option(False, "--resume", help="continue the interrupted run in --out (same inputs)"),
    baseline: str = BASELINE,
    baseline_arch: str = BASELINE_ARCH,
    min_top1: float = MIN_TOP1,
    max_drop: float = MAX_DROP,
    workers: str = WORKERS,
    cache: str = typer.Option("auto", "--cache", help="store the teacher's and reference's outputs per view: off, "
                              "auto (when views are fixed: data.views, or no random augmentation; in "
                              "$KDCLI_CACHE_DIR or ~/.cache/kdcli) or a folder"),
    dry_run: bool = DRY_RUN,
    log: list[str] = LOG,
    export: str = typer.Option(None, "--export", help="also export the student: onnx, int8, fp16, bf16 (comma-separated) "
                               "into OUT/export/; the gate applies to every exported file too"),
    json_: bool = JSON,
) -> None:
    """Distill TEACHER into STUDENT through the recipe's stages; write the student and a report to --out."""
    from kdcli.display import print_run
    from kdcli.jobs.plan import ModelChoices
    from kdcli.jobs.training import train_student
    from kdcli.training.recipe import load_recipe

    plan = load_recipe(recipe, set_ or [], seed)
    choices = ModelChoices(
        teacher_arch, student_arch,
        opt.flags("teacher-", teacher_image_size, teacher_mean, teacher_std, teacher_interpolation),
        opt.flags("", image_size, mean, std, interpolation), reset_head, allow_weak_teacher)
    extra = more_teachers or []
    with _progress() as listener:
        report, failed = _finish(lambda: train_student(
            plan, student, data, out, teacher_ref=teacher, extra_teachers=extra,
            teacher_weights=opt.weights(teacher_weights, 1 + len(extra)),
            init_from=teacher if init_from_teacher else None, choices=choices, device_name=device, force=force,
            resume=resume, listener=listener, baseline_ref=baseline, baseline_arch=baseline_arch,
            min_top1=min_top1, max_drop=max_drop, dry_run=dry_run, show_plan=_plan_shower(), export=export,
            log=log, workers=opt.workers(workers), cache=cache, precision=precision, channels_last=channels_last))
    if dry_run:
        return _dry_run(report, json_)
    _show(report, failed, json_, lambda: print_run(report, out))


@app.command(cls=Command, epilog=examples("ablate"))
def ablate(
    teacher: str = typer.Argument(..., help="teacher: a .safetensors file, a timm folder, hf-hub:ORG/NAME or ARCH.TAG"),
    student: str = typer.Argument(..., help="student: a timm architecture (random init), a pretrained name or a "
                                  "checkpoint to start from"),
    data: str = typer.Option(..., "--data", "-d", help="ImageFolder root (train/, val/), CIFAR python folder, or 'synthetic'"),
    recipe: str = typer.Option(None, "--recipe", "-r", help="the sequential recipe whose cells are compared "
                               "[default: smskd]"),
    seeds: int = typer.Option(3, "--seeds", min=1, help="runs per cell, seeds recipe.seed, +1, ..."),
    cells: str = typer.Option(None, "--cells", help="run only these cells, comma-separated (e.g. alone,kd,seq-tcp) "
                              "[default: all]"),
    epochs: int = typer.Option(None, "--epochs", help="total epochs of every cell [default: the recipe's total]"),
    out: Path = typer.Option(Path("kdcli-ablate"), "--out", "-o", help="output folder: one folder per cell and seed, "
                             "report.json, report.md, ablation.png"),
    set_: list[str] = SET,
    more_teachers: list[str] = typer.Option(None, "--teacher", help="another teacher (repeatable): adds the "
                                            "multi-teacher cell (the other cells distil from TEACHER)"),
    teacher_weights: str = TEACHER_WEIGHTS,
    teacher_arch: str = typer.Option(None, "--teacher-arch", help="teacher architecture, if the weights do not say"),
    student_arch: str = typer.Option(None, "--student-arch", help="student architecture, if its weights do not say"),
    init_from_teacher: bool = typer.Option(False, "--init-from-teacher", help="start every cell's student (the "
                                           "student alone's too) from TEACHER's weights (same family, fewer blocks)"),
    allow_weak_teacher: bool = typer.Option(False, "--allow-weak-teacher", help="train even if a teacher scores at "
                                            "chance on the validation split"),
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="start afresh: write into a non-empty --out, reuse no earlier run"),
    resume: bool = typer.Option(False, "--resume", help="continue the ablation in --out (also what rerunning does)"),
    json_: bool = JSON,
) -> None:
    """The paper's ablation on your data: student alone, KD, joint, sequential with and without anchor, 1-4 stages."""
    from kdcli.display import print_ablation
    from kdcli.jobs.ablate import AblationInputs, run_ablation
    from kdcli.jobs.plan import ModelChoices
    from kdcli.training.ablation import BASE_RECIPE
    from kdcli.training.recipe import load_recipe

    teachers = [teacher, *(more_teachers or [])]
    base = load_recipe(recipe or BASE_RECIPE, set_ or [])
    inputs = AblationInputs(
        teachers, opt.weights(teacher_weights, len(teachers)), student, data, base, seeds, epochs,
        ModelChoices(teacher_arch, student_arch, allow_weak_teacher=allow_weak_teacher), init_from_teacher,
        [name.strip() for name in cells.split(",") if name.strip()] if cells else None)
    show = None if json_ else (lambda line: err_console.print(line, markup=False, highlight=False, soft_wrap=True))
    summary = run_ablation(inputs, out, device, force and not resume, _progress, show)
    _print_json(summary) if json_ else print_ablation(summary, out)


@app.command(cls=Command, epilog=examples("train"))
def train(
    arch: str = typer.Argument(..., help="a timm architecture (random init), ARCH.TAG or hf-hub:ORG/NAME (fine-tune "
                               "pretrained weights), or a .safetensors/folder to fine-tune"),
    data: str = typer.Option(..., "--data", "-d", help="ImageFolder root (train/, val/), CIFAR python folder, or 'synthetic'"),
    out: Path = typer.Option(Path("kdcli-train"), "--out", "-o", help="output folder: model.safetensors + config.json + report"),
    recipe: str = typer.Option("supervised", "--recipe", "-r", help="built-in recipe name or YAML file"),
    epochs: int = typer.Option(None, "--epochs", help="epochs of every stage (shorthand for --set stages.N.epochs)"),
    set_: list[str] = SET,
    seed: int = typer.Option(None, "--seed", help="overrides the recipe's seed"),
    arch_flag: str = typer.Option(None, "--arch", help="architecture of ARCH's weights, if they do not say"),
    image_size: int = opt.size_option("", "its (overrides the recipe's data.image_size);"),
    mean: str = opt.mean_option("", "its"),
    std: str = opt.std_option("", "its"),
    interpolation: str = opt.interp_option("", "its"),
    reset_head: bool = RESET_HEAD,
    device: str = DEVICE,
    precision: str = PRECISION,
    channels_last: bool = CHANNELS_LAST,
    force: bool = FORCE,
    resume: bool = typer.Option(False, "--resume", help="continue the interrupted run in --out (same inputs)"),
    baseline: str = BASELINE,
    baseline_arch: str = BASELINE_ARCH,
    min_top1: float = MIN_TOP1,
    workers: str = WORKERS,
    dry_run: bool = DRY_RUN,
    log: list[str] = LOG,
    json_: bool = JSON,
) -> None:
    """Plain supervised training of ARCH, no teacher: for teachers and baselines."""
    from kdcli.display import print_run
    from kdcli.jobs.training import train_student
    from kdcli.training.recipe import load_recipe

    plan = load_recipe(recipe, set_ or [], seed)
    if epochs is not None:
        if epochs < 1:
            raise KdcliError(f"--epochs {epochs}: must be 1 or more")
        plan = load_recipe(recipe, [*(set_ or []), *(f"stages.{i}.epochs={epochs}" for i in range(len(plan.stages)))],
                           seed)
    from kdcli.jobs.plan import ModelChoices

    choices = ModelChoices(student_arch=arch_flag, student_flags=opt.flags("", image_size, mean, std, interpolation),
                           reset_head=reset_head)
    with _progress() as listener:
        report, failed = _finish(lambda: train_student(
            plan, arch, data, out, choices=choices, device_name=device, force=force, resume=resume,
            listener=listener, kind="train", baseline_ref=baseline, baseline_arch=baseline_arch, min_top1=min_top1,
            dry_run=dry_run, show_plan=_plan_shower(), log=log, workers=opt.workers(workers), precision=precision,
            channels_last=channels_last))
    if dry_run:
        return _dry_run(report, json_)
    _show(report, failed, json_, lambda: print_run(report, out))


@app.command("eval", cls=Command, epilog=examples("eval"))
def eval_(
    checkpoint: str = typer.Argument(..., help="a .safetensors file, a timm folder (fp32, fp16 or bf16), hf-hub:ORG/NAME, "
                                     "ARCH.TAG, or an .onnx file that kdcli export wrote"),
    data: str = typer.Option(..., "--data", "-d", help="ImageFolder root (its val/ is used), a folder of class folders "
                             "(a held-out set), CIFAR python folder, or 'synthetic'"),
    split: str = typer.Option(None, "--split", help="evaluate on DATA/SPLIT/<class>/* instead, e.g. test"),
    arch: str = typer.Option(None, "--arch", help="architecture, if the weights do not say"),
    teacher: str = typer.Option(None, "--teacher", help="the teacher: agreement, retention, speed-up and size ratio"),
    teacher_arch: str = typer.Option(None, "--teacher-arch", help="teacher architecture, if its weights do not say"),
    image_size: int = opt.size_option("", "the checkpoint's"),
    mean: str = opt.mean_option("", "the checkpoint's"),
    std: str = opt.std_option("", "the checkpoint's"),
    interpolation: str = opt.interp_option("", "the checkpoint's"),
    teacher_image_size: int = opt.size_option("teacher-", "the teacher's"),
    teacher_mean: str = opt.mean_option("teacher-", "the teacher's"),
    teacher_std: str = opt.std_option("teacher-", "the teacher's"),
    teacher_interpolation: str = opt.interp_option("teacher-", "the teacher's"),
    baseline: str = BASELINE,
    baseline_arch: str = BASELINE_ARCH,
    out: Path = typer.Option(None, "--out", "-o", help="write report.json, report.md and reliability.png here"),
    force: bool = FORCE,
    min_top1: float = MIN_TOP1,
    max_drop: float = MAX_DROP,
    threads: int = typer.Option(None, "--threads", max=1024, help="CPU threads for evaluation and timing [default: torch's]"),
    batch_size: int = typer.Option(256, "--batch-size", min=1, max=65536, help="images per evaluation batch "
                                   "(lower it when memory runs out)"),
    workers: int = typer.Option(0, "--workers", min=0, max=64, help="data-loading worker processes (0: load in the "
                                "main process)"),
    device: str = DEVICE,
    json_: bool = JSON,
) -> None:
    """Accuracy, calibration and cost of a checkpoint, against a teacher and a baseline; a quality gate for CI."""
    from kdcli.display import print_eval
    from kdcli.jobs.evaluation import eval_checkpoint

    onnx = [Path(ref) for ref in (checkpoint, teacher, baseline) if ref and ref.lower().endswith(".onnx")]
    if onnx:  # a missing extra is found before any work is announced
        from kdcli.models.export import require_extra

        require_extra(f"evaluating {onnx[0].name}")
    with _progress() as listener:
        listener.phase(f"evaluating {printable(checkpoint)} on {printable(data)}, then timing it")
        report, failed = _finish(lambda: eval_checkpoint(
            checkpoint, data, arch, batch_size=batch_size, workers=workers, device_name=device, teacher_ref=teacher,
            teacher_arch=teacher_arch, baseline_ref=baseline, baseline_arch=baseline_arch, out=out, force=force,
            min_top1=min_top1, max_drop=max_drop, threads=threads,
            flags=opt.flags("", image_size, mean, std, interpolation),
            teacher_flags=opt.flags("teacher-", teacher_image_size, teacher_mean, teacher_std, teacher_interpolation),
            split=split))
    _show(report, failed, json_, lambda: print_eval(report, checkpoint, out))


@app.command("export", cls=Command, epilog=examples("export"))
def export_(
    student: str = typer.Argument(..., help="the student: a timm folder or .safetensors file (e.g. run1/student)"),
    format_: str = typer.Option(..., "--format", "-f", help="onnx, int8, fp16, bf16; several comma-separated: onnx,int8"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: model.onnx, model.int8.onnx, fp16/, bf16/, report"),
    data: str = typer.Option(None, "--data", "-d", help="the student's data: int8 calibrates on its training images; "
                             "every file is checked on its validation split (without: a logit check on random inputs)"),
    arch: str = typer.Option(None, "--arch", help="architecture, if the weights do not say"),
    teacher: str = typer.Option(None, "--teacher", help="the teacher: agreement of each file with it, and --max-drop"),
    teacher_arch: str = typer.Option(None, "--teacher-arch", help="teacher architecture, if its weights do not say"),
    calibration_images: int = typer.Option(256, "--calibration-images", help="training images int8 is calibrated on"),
    seed: int = typer.Option(0, "--seed", help="seed of the calibration sample"),
    min_top1: float = typer.Option(None, "--min-top1", help="quality gate: exit 1 when any file's top-1 (%) is below this"),
    max_drop: float = typer.Option(None, "--max-drop", help="quality gate: exit 1 when teacher top-1 - a file's top-1 "
                                   "exceeds these points"),
    threads: int = typer.Option(None, "--threads", help="CPU threads for checking and timing (default: torch's)"),
    device: str = DEVICE,
    force: bool = FORCE,
    json_: bool = JSON,
) -> None:
    """Export a student to ONNX, int8 ONNX (static quantisation), fp16 or bf16; check each file against it."""
    from kdcli.display import print_export
    from kdcli.jobs.export import export_student

    report, failed = _finish(lambda: export_student(
        student, format_, out, data_spec=data, arch=arch, teacher_ref=teacher, teacher_arch=teacher_arch,
        calibration_images=calibration_images, seed=seed, threads=threads, device_name=device, force=force,
        min_top1=min_top1, max_drop=max_drop))
    _show(report, failed, json_, lambda: print_export(report, out))


@app.command(cls=Command, epilog=examples("demo"))
def demo(
    out: Path = typer.Option(None, "--out", "-o", help="output folder [default: a new temporary folder]"),
    data: str = typer.Option("synthetic", "--data", "-d", help="data for all three runs"),
    teacher: str = typer.Option(None, "--teacher", help="teacher architecture [default: resnet10t]"),
    student: str = typer.Option(None, "--student", help="student architecture [default: test_resnet]"),
    device: str = DEVICE,
    force: bool = FORCE,
    json_: bool = JSON,
) -> None:
    """Train a teacher, a baseline student and a distilled student on built-in data; compare them."""
    import tempfile

    from kdcli.jobs import demo as demo_module

    out = out or Path(tempfile.mkdtemp(prefix="kdcli-demo-"))
    reports = demo_module.run_demo(out, data, teacher or demo_module.TEACHER, student or demo_module.STUDENT,
                                   device, force, _progress)
    if json_:
        _print_json(reports)
        return
    from kdcli.display import print_demo

    print_demo(reports, out)


@app.command(cls=Command, epilog=examples("convert"))
def convert(
    checkpoint: str = typer.Argument(..., help="a PyTorch/timm/Lightning checkpoint: .pth, .pth.tar, .pt, .bin, .ckpt "
                                     "(or .safetensors)"),
    arch: str = typer.Option(None, "--arch", help="its timm architecture [default: a timm train.py checkpoint's args.model]"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: model.safetensors + config.json"),
    image_size: int = opt.size_option("", "the size it was trained at;"),
    mean: str = opt.mean_option("", "the"),
    std: str = opt.std_option("", "the"),
    interpolation: str = opt.interp_option("", "the"),
    ema: bool = typer.Option(False, "--ema", help="take the EMA weights (state_dict_ema / model_ema)"),
    prefix: str = typer.Option(None, "--prefix", help="take only the weights under this key prefix and strip it "
                               "(Lightning: the attribute holding the model, e.g. model.)"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out (only once the new one is complete)"),
    json_: bool = JSON,
) -> None:
    """Turn a training checkpoint into a timm-layout folder, loading it with torch.load(weights_only=True) only."""
    from kdcli.jobs.outputs import Outputs
    from kdcli.models.convert import convert_checkpoint

    flags = opt.flags("", image_size, mean, std, interpolation)
    with Outputs(out, force=force, inputs={"checkpoint": checkpoint}, phase="converting") as outputs:
        summary = convert_checkpoint(checkpoint, arch, outputs.folder, flags, ema, prefix)
    summary["out"] = str(out / Path(summary["out"]).name)
    if json_:
        _print_json(summary)
        return
    from kdcli.display import print_conversion

    print_conversion(summary, checkpoint, out)


@app.command(cls=Command, epilog=examples("methods"))
def methods(json_: bool = JSON) -> None:
    """The KD methods a recipe can use: parameters, defaults, and what each one taps."""
    from kdcli.display import print_methods
    from kdcli.models.inspection import method_rows

    rows = method_rows()
    if json_:
        _print_json({"methods": rows})
        return
    print_methods(rows)


@app.command(cls=Command, epilog=examples("inspect"))
def inspect(
    model: str = typer.Argument(..., help="a timm architecture name, a .safetensors file / timm folder, "
                                "hf-hub:ORG/NAME or ARCH.TAG"),
    image_size: int = typer.Option(None, "--image-size", help="input size [default: the checkpoint's, else timm's]"),
    arch: str = typer.Option(None, "--arch", help="architecture of the weights, if they do not say"),
    num_classes: int = typer.Option(1000, "--num-classes", min=1, help="classes of an architecture named by name"),
    mean: str = opt.mean_option("", "its"),
    std: str = opt.std_option("", "its"),
    interpolation: str = opt.interp_option("", "its"),
    json_: bool = JSON,
) -> None:
    """Architecture, parameters, size, preprocessing and the taps (index, module path, channels, reduction) of a model."""
    from kdcli.display import print_inspection
    from kdcli.models.inspection import inspect_model

    info = inspect_model(model, image_size, arch, num_classes, opt.flags("", None, mean, std, interpolation))
    if json_:
        _print_json(info)
        return
    print_inspection(info)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app; returns the exit code (kdcli/exits.py). -q/-v are taken from anywhere."""
    global verbosity
    args = list(sys.argv[1:] if argv is None else argv)
    verbosity = sum(VERBOSITY.get(arg, 0) for arg in args)
    return run(app, [arg for arg in args if arg not in VERBOSITY])
