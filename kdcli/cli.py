"""The command line: parse, call the library, print. No training logic here."""

from __future__ import annotations

import json
import os
import shlex
import sys
import traceback
from pathlib import Path

import typer
import yaml
from rich.console import Console

from kdcli import __version__
from kdcli.errors import Interrupted, KdcliError, QualityGateFailed

app = typer.Typer(
    name="kdcli",
    help="Compress timm image classifiers by sequential multi-stage knowledge distillation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(help="Validate, show and describe recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

out_console = Console()
err_console = Console(stderr=True)

DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda")
SET = typer.Option(None, "--set", help="override a recipe field: dotted.path=value (repeatable)")
JSON = typer.Option(False, "--json", help="print the machine-readable result to stdout, nothing else")


def _version(value: bool) -> None:
    if value:
        print(f"kdcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks (also accepted after any command)"),
) -> None:
    """kdcli: teacher.safetensors + a timm student name -> a smaller student, timm-native, with a report."""


def _progress(label: str = ""):
    from kdcli.progress import progress_for_terminal

    return progress_for_terminal(label)


def _print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _finish(job):
    """Run a job; a failed quality gate still returns its report, with the failure to raise after printing."""
    try:
        return job(), None
    except QualityGateFailed as failed:
        return failed.report, failed


def _show(report: dict, failed: QualityGateFailed | None, json_: bool, print_text) -> None:
    _print_json(report) if json_ else print_text()
    if failed is not None:
        raise failed


BASELINE = typer.Option(None, "--baseline", help="a baseline checkpoint (e.g. the student trained without KD) to compare with")
BASELINE_ARCH = typer.Option(None, "--baseline-arch", help="baseline architecture, if its weights do not say")
MIN_TOP1 = typer.Option(None, "--min-top1", help="quality gate: exit 1 when student top-1 (%) is below this")
MAX_DROP = typer.Option(None, "--max-drop", help="quality gate: exit 1 when teacher top-1 - student top-1 exceeds these points")


@app.command()
def distill(
    teacher: str = typer.Argument(..., help="teacher: a .safetensors file or a timm folder (model.safetensors + config.json)"),
    student: str = typer.Argument(..., help="student: a timm architecture name, or a .safetensors/folder to start from"),
    data: str = typer.Option(..., "--data", "-d", help="ImageFolder root (train/, val/), CIFAR python folder, or 'synthetic'"),
    recipe: str = typer.Option(None, "--recipe", "-r", help="built-in recipe name or YAML file [default: smskd]"),
    out: Path = typer.Option(Path("kdcli-distill"), "--out", "-o", help="output folder"),
    set_: list[str] = SET,
    seed: int = typer.Option(None, "--seed", help="overrides the recipe's seed"),
    teacher_arch: str = typer.Option(None, "--teacher-arch", help="teacher architecture, if the weights do not say"),
    student_arch: str = typer.Option(None, "--student-arch", help="student architecture, if its weights do not say"),
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="write into a non-empty --out"),
    resume: bool = typer.Option(False, "--resume", help="continue the interrupted run in --out (same inputs)"),
    baseline: str = BASELINE,
    baseline_arch: str = BASELINE_ARCH,
    min_top1: float = MIN_TOP1,
    max_drop: float = MAX_DROP,
    export: str = typer.Option(None, "--export", help="also export the student: onnx, int8, fp16, bf16 (comma-separated) "
                               "into OUT/export/; the gate applies to every exported file too"),
    json_: bool = JSON,
) -> None:
    """Distill TEACHER into STUDENT through the recipe's stages; write the student and a report to --out."""
    from kdcli.display import print_run
    from kdcli.jobs.training import train_student
    from kdcli.training.recipe import load_recipe

    plan = load_recipe(recipe, set_ or [], seed)
    with _progress() as listener:
        report, failed = _finish(lambda: train_student(
            plan, student, data, out, teacher_ref=teacher, teacher_arch=teacher_arch, student_arch=student_arch,
            device_name=device, force=force, resume=resume, listener=listener, baseline_ref=baseline,
            baseline_arch=baseline_arch, min_top1=min_top1, max_drop=max_drop, export=export))
    _show(report, failed, json_, lambda: print_run(report, out))


@app.command()
def train(
    arch: str = typer.Argument(..., help="a timm architecture name, or a .safetensors/folder to fine-tune"),
    data: str = typer.Option(..., "--data", "-d", help="ImageFolder root (train/, val/), CIFAR python folder, or 'synthetic'"),
    out: Path = typer.Option(Path("kdcli-train"), "--out", "-o", help="output folder: model.safetensors + config.json + report"),
    recipe: str = typer.Option("supervised", "--recipe", "-r", help="built-in recipe name or YAML file"),
    epochs: int = typer.Option(None, "--epochs", help="epochs of every stage (shorthand for --set stages.N.epochs)"),
    set_: list[str] = SET,
    seed: int = typer.Option(None, "--seed", help="overrides the recipe's seed"),
    arch_flag: str = typer.Option(None, "--arch", help="architecture of ARCH's weights, if they do not say"),
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="write into a non-empty --out"),
    resume: bool = typer.Option(False, "--resume", help="continue the interrupted run in --out (same inputs)"),
    baseline: str = BASELINE,
    baseline_arch: str = BASELINE_ARCH,
    min_top1: float = MIN_TOP1,
    json_: bool = JSON,
) -> None:
    """Plain supervised training, no teacher: for teachers and baselines."""
    from kdcli.display import print_run
    from kdcli.jobs.training import train_student
    from kdcli.training.recipe import load_recipe

    plan = load_recipe(recipe, set_ or [], seed)
    if epochs is not None:
        if epochs < 1:
            raise KdcliError(f"--epochs {epochs}: must be 1 or more")
        plan = plan.model_copy(update={"stages": [s.model_copy(update={"epochs": epochs}) for s in plan.stages]})
    with _progress() as listener:
        report, failed = _finish(lambda: train_student(
            plan, arch, data, out, student_arch=arch_flag, device_name=device, force=force, resume=resume,
            listener=listener, kind="train", baseline_ref=baseline, baseline_arch=baseline_arch, min_top1=min_top1))
    _show(report, failed, json_, lambda: print_run(report, out))


@app.command("eval")
def eval_(
    checkpoint: str = typer.Argument(..., help="a .safetensors file, a timm folder (fp32, fp16 or bf16) or an .onnx file "
                                     "that kdcli export wrote"),
    data: str = typer.Option(..., "--data", "-d", help="ImageFolder root (train/, val/), CIFAR python folder, or 'synthetic'"),
    arch: str = typer.Option(None, "--arch", help="architecture, if the weights do not say"),
    teacher: str = typer.Option(None, "--teacher", help="the teacher: agreement, retention, speed-up and size ratio"),
    teacher_arch: str = typer.Option(None, "--teacher-arch", help="teacher architecture, if its weights do not say"),
    baseline: str = BASELINE,
    baseline_arch: str = BASELINE_ARCH,
    out: Path = typer.Option(None, "--out", "-o", help="write report.json, report.md and reliability.png here"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty --out"),
    min_top1: float = MIN_TOP1,
    max_drop: float = MAX_DROP,
    threads: int = typer.Option(None, "--threads", help="CPU threads for evaluation and timing [default: torch's]"),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    workers: int = typer.Option(0, "--workers", min=0),
    device: str = DEVICE,
    json_: bool = JSON,
) -> None:
    """Accuracy, calibration and cost of a checkpoint, against a teacher and a baseline; a quality gate for CI."""
    from kdcli.display import print_eval
    from kdcli.jobs.evaluation import eval_checkpoint

    report, failed = _finish(lambda: eval_checkpoint(
        checkpoint, data, arch, batch_size=batch_size, workers=workers, device_name=device, teacher_ref=teacher,
        teacher_arch=teacher_arch, baseline_ref=baseline, baseline_arch=baseline_arch, out=out, force=force,
        min_top1=min_top1, max_drop=max_drop, threads=threads))
    _show(report, failed, json_, lambda: print_eval(report, checkpoint, out))


@app.command("export")
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
    force: bool = typer.Option(False, "--force", help="write into a non-empty --out"),
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


@app.command()
def demo(
    out: Path = typer.Option(None, "--out", "-o", help="output folder [default: a new temporary folder]"),
    data: str = typer.Option("synthetic", "--data", "-d", help="data for all three runs"),
    teacher: str = typer.Option(None, "--teacher", help="teacher architecture [default: resnet10t]"),
    student: str = typer.Option(None, "--student", help="student architecture [default: test_resnet]"),
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="write into a non-empty --out"),
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


@app.command()
def convert(
    checkpoint: str = typer.Argument(..., help="a PyTorch/timm checkpoint: .pth, .pt, .bin, .ckpt (or .safetensors)"),
    arch: str = typer.Option(..., "--arch", help="its timm architecture"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: model.safetensors + config.json"),
    image_size: int = typer.Option(None, "--image-size", min=1, help="the size it was trained at [default: the arch's]"),
    ema: bool = typer.Option(False, "--ema", help="take the EMA weights (state_dict_ema / model_ema)"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty --out"),
    json_: bool = JSON,
) -> None:
    """Turn a pickle checkpoint into a timm-layout folder, loading it with torch.load(weights_only=True) only."""
    from kdcli.models.convert import convert_checkpoint
    from kdcli.jobs.common import check_out

    check_out(out, force)
    summary = convert_checkpoint(checkpoint, arch, out, image_size, ema)
    if json_:
        _print_json(summary)
        return
    out_console.print(
        f"converted {summary['tensors']} tensors from {summary['weights']} of {checkpoint}: {arch}, "
        f"{summary['num_classes']} classes, {summary['params'] / 1e6:.3f} M params -> {out}\n"
        f"use it: kdcli distill {out} STUDENT --data DIR   or   timm.create_model('local-dir:{out}', pretrained=True)",
        markup=False, highlight=False, soft_wrap=True,
    )


@recipe_app.command("validate")
def recipe_validate(
    files: list[str] = typer.Argument(..., help="recipe YAML files or built-in names"),
    set_: list[str] = SET,
) -> None:
    """Check recipes against the schema; print every problem with its field path."""
    from kdcli.training.recipe import RecipeError, load_recipe

    failed = False
    for ref in files:
        try:
            plan = load_recipe(ref, set_ or [])
        except RecipeError as err:
            failed = True
            for problem in err.problems:
                _report_error(problem)
            continue
        out_console.print(f"ok: {ref} ('{plan.name}', {len(plan.stages)} stages, hash {plan.digest()})",
                          markup=False, soft_wrap=True)
    if failed:
        raise typer.Exit(2)


@recipe_app.command("show")
def recipe_show(
    ref: str = typer.Argument(..., help="built-in name or YAML file"),
    set_: list[str] = SET,
) -> None:
    """Print a recipe as it would run: defaults filled in, overrides applied."""
    from kdcli.training.recipe import load_recipe

    sys.stdout.write(load_recipe(ref, set_ or []).to_yaml())


@recipe_app.command("list")
def recipe_list() -> None:
    """The built-in recipes, usable by name with --recipe."""
    from kdcli.training.recipe import builtin_dir, builtin_names

    for name in builtin_names():
        raw = yaml.safe_load((builtin_dir() / f"{name}.yaml").read_text(encoding="utf-8"))
        out_console.print(f"[bold]{name}[/bold]: {' '.join(str(raw.get('description', '')).split())}")


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the recipe's JSON Schema (for editors and CI checks)."""
    from kdcli.training.recipe import recipe_schema as schema

    _print_json(schema())


@app.command()
def methods(json_: bool = JSON) -> None:
    """The KD methods a recipe can use: parameters, defaults, and what each one taps."""
    from kdcli.display import print_methods
    from kdcli.models.inspection import method_rows

    rows = method_rows()
    if json_:
        _print_json({"methods": rows})
        return
    print_methods(rows)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="a timm architecture name, or a .safetensors file / timm folder"),
    image_size: int = typer.Option(None, "--image-size", help="input size [default: the checkpoint's, else timm's]"),
    arch: str = typer.Option(None, "--arch", help="architecture of the weights, if they do not say"),
    num_classes: int = typer.Option(1000, "--num-classes", min=1, help="classes of an architecture named by name"),
    json_: bool = JSON,
) -> None:
    """Architecture, parameters, size and the taps (index, module path, channels, reduction) of a model."""
    from kdcli.display import print_inspection
    from kdcli.models.inspection import inspect_model

    info = inspect_model(model, image_size, arch, num_classes)
    if json_:
        _print_json(info)
        return
    print_inspection(info)


def _report_error(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


def _one_line(err: KdcliError) -> str:
    message = str(err)
    if "Original Traceback" in message:  # raised in a DataLoader worker: torch re-raises it wrapped in a traceback
        message = message.strip().splitlines()[-1].partition(": ")[2]
    return message


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and maps outcomes to exit codes (0 ok, 1 gate failed, 2 bad input, 130 interrupt)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("KDCLI_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        code = app(args=args, prog_name="kdcli", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except KdcliError as err:
        if debug:
            traceback.print_exc()
        _report_error(_one_line(err))
        return err.exit_code
    except QualityGateFailed as err:
        _report_error(str(err))
        return err.exit_code
    except Interrupted as err:
        again = [a for a in args if a != "--force"] + ([] if "--resume" in args else ["--resume"])
        _report_error(f"{err}; resume with: {shlex.join(['kdcli', *again])}")
        return err.exit_code
    except typer.Exit as err:
        return err.exit_code
    except typer.TyperException as err:  # usage: unknown option, missing argument, bad value
        show = getattr(err, "show", None)
        show() if show else _report_error(err.format_message())
        return 2
    except (KeyboardInterrupt, typer.Abort):
        _report_error("interrupted")
        return 130
    except Exception as err:  # a bug in kdcli, not the user's input
        if debug:
            traceback.print_exc()
        _report_error(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback, and report it)")
        return 3
