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
from rich.table import Table
from rich.text import Text

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


def _model_table(title: str, rows: list[tuple[str, dict]]) -> Table:
    table = Table(title=title)
    for column in ("model", "arch", "top-1 %", "top-5 %", "params", "file"):
        table.add_column(column, justify="left" if column in ("model", "arch") else "right")
    for name, entry in rows:
        size = entry.get("file_bytes")
        table.add_row(
            name, entry["arch"], f"{entry['top1']:.2f}", f"{entry['top5']:.2f}", f"{entry['params'] / 1e6:.3f} M",
            f"{size / 2**20:.2f} MiB" if size else "–",
        )
    return table


def _print_run(report: dict, out: Path) -> None:
    rows = [("teacher", report["teacher"])] if report.get("teacher") else []
    rows.append(("student", report["student"]))
    out_console.print(_model_table("Result", rows))
    stages = Table(title="Stages")
    for column in ("#", "stage", "epochs", "anchor", "top-1 after %", "time"):
        stages.add_column(column, justify="left" if column in ("stage", "anchor") else "right")
    for i, stage in enumerate(report["stages"]):
        stages.add_row(str(i), stage["name"], str(stage["epochs"]), stage["anchor"], f"{stage['val_top1']:.2f}",
                       f"{stage['seconds']:.1f}s")
    out_console.print(stages)
    where = out / "student" if report["kind"] == "distill" else out
    out_console.print(f"student written to {where}; report in {out / 'report.md'}")


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
    json_: bool = JSON,
) -> None:
    """Distill TEACHER into STUDENT through the recipe's stages; write the student and a report to --out."""
    from kdcli.jobs import train_student
    from kdcli.recipe import load_recipe

    plan = load_recipe(recipe, set_ or [], seed)
    with _progress() as listener:
        report = train_student(plan, student, data, out, teacher_ref=teacher, teacher_arch=teacher_arch,
                               student_arch=student_arch, device_name=device, force=force, resume=resume,
                               listener=listener)
    _print_json(report) if json_ else _print_run(report, out)


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
    json_: bool = JSON,
) -> None:
    """Plain supervised training, no teacher: for teachers and baselines."""
    from kdcli.jobs import train_student
    from kdcli.recipe import load_recipe

    plan = load_recipe(recipe, set_ or [], seed)
    if epochs is not None:
        if epochs < 1:
            raise KdcliError(f"--epochs {epochs}: must be 1 or more")
        plan = plan.model_copy(update={"stages": [s.model_copy(update={"epochs": epochs}) for s in plan.stages]})
    with _progress() as listener:
        report = train_student(plan, arch, data, out, student_arch=arch_flag, device_name=device, force=force,
                               resume=resume, listener=listener, kind="train")
    _print_json(report) if json_ else _print_run(report, out)


@app.command("eval")
def eval_(
    checkpoint: str = typer.Argument(..., help="a .safetensors file or a timm folder"),
    data: str = typer.Option(..., "--data", "-d", help="ImageFolder root (train/, val/), CIFAR python folder, or 'synthetic'"),
    arch: str = typer.Option(None, "--arch", help="architecture, if the weights do not say"),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    workers: int = typer.Option(0, "--workers", min=0),
    device: str = DEVICE,
    json_: bool = JSON,
) -> None:
    """Top-1, top-5, parameters and size of any timm safetensors checkpoint on the validation split."""
    from kdcli.jobs import eval_checkpoint

    result = eval_checkpoint(checkpoint, data, arch, batch_size, workers, device)
    if json_:
        _print_json(result)
    else:
        out_console.print(_model_table(f"Evaluation on {result['data']}", [(checkpoint, result["model"])]))


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

    from kdcli import demo as demo_module

    out = out or Path(tempfile.mkdtemp(prefix="kdcli-demo-"))
    reports = demo_module.run_demo(out, data, teacher or demo_module.TEACHER, student or demo_module.STUDENT,
                                   device, force, _progress)
    if json_:
        _print_json(reports)
        return
    table = Table(title=f"kdcli demo: {reports['teacher']['run']['data']}")
    for column in ("model", "arch", "epochs", "top-1 %", "params", "file", "train time"):
        table.add_column(column, justify="left" if column in ("model", "arch") else "right")
    for label, report in reports.items():
        entry = report["student"]
        epochs = sum(stage["epochs"] for stage in report["stages"])
        table.add_row(label, entry["arch"], str(epochs), f"{entry['top1']:.2f}", f"{entry['params'] / 1e6:.3f} M",
                      f"{entry['file_bytes'] / 2**20:.2f} MiB", f"{report['run']['seconds']:.0f}s")
    out_console.print(table)
    gain = reports["distilled"]["student"]["top1"] - reports["baseline"]["student"]["top1"]
    out_console.print(f"distillation vs the same student alone: {gain:+.2f} top-1 points; outputs in {out}")


@recipe_app.command("validate")
def recipe_validate(
    files: list[str] = typer.Argument(..., help="recipe YAML files or built-in names"),
    set_: list[str] = SET,
) -> None:
    """Check recipes against the schema; print every problem with its field path."""
    from kdcli.recipe import RecipeError, load_recipe

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
    from kdcli.recipe import load_recipe

    sys.stdout.write(load_recipe(ref, set_ or []).to_yaml())


@recipe_app.command("list")
def recipe_list() -> None:
    """The built-in recipes, usable by name with --recipe."""
    from kdcli.recipe import builtin_dir, builtin_names

    for name in builtin_names():
        raw = yaml.safe_load((builtin_dir() / f"{name}.yaml").read_text(encoding="utf-8"))
        out_console.print(f"[bold]{name}[/bold]: {' '.join(str(raw.get('description', '')).split())}")


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the recipe's JSON Schema (for editors and CI checks)."""
    from kdcli.recipe import recipe_schema as schema

    _print_json(schema())


@app.command()
def methods(json_: bool = JSON) -> None:
    """The KD methods a recipe can use: parameters, defaults, and what each one taps."""
    from kdcli.inspection import brief, method_rows

    rows = method_rows()
    if json_:
        _print_json({"methods": rows})
        return
    table = Table(title="KD methods (recipe: losses: [{method: NAME, weight: W, ...}])")
    for column, ratio in (("method", 1), ("what", 4), ("parameters (defaults)", 4), ("reads", 2)):
        table.add_column(column, ratio=ratio, no_wrap=column == "method")
    for row in rows:
        params = ", ".join(f"{k}={brief(v['default'])}" for k, v in row["parameters"].items())
        table.add_row(*(Text(cell) for cell in (row["name"], row["summary"], params, row["reads"])))
    out_console.print(table)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="a timm architecture name, or a .safetensors file / timm folder"),
    image_size: int = typer.Option(None, "--image-size", help="input size [default: the checkpoint's, else timm's]"),
    arch: str = typer.Option(None, "--arch", help="architecture of the weights, if they do not say"),
    num_classes: int = typer.Option(1000, "--num-classes", min=1, help="classes of an architecture named by name"),
    json_: bool = JSON,
) -> None:
    """Architecture, parameters, size and the taps (index, module path, channels, reduction) of a model."""
    from kdcli.inspection import inspect_model

    info = inspect_model(model, image_size, arch, num_classes)
    if json_:
        _print_json(info)
        return
    source = "weights file" if info["from_file"] else "random init"
    out_console.print(f"[bold]{info['arch']}[/bold] ({source}): {info['params'] / 1e6:.3f} M params, "
                      f"{info['bytes'] / 2**20:.2f} MiB, {info['num_classes']} classes, "
                      f"input {info['image_size']}x{info['image_size']}", highlight=False)
    table = Table(title="taps (recipe: {feature: N}, {module: PATH} or penultimate)")
    for column in ("tap", "module path", "channels", "reduction", f"shape at {info['image_size']}"):
        table.add_column(column, justify="right" if column in ("channels", "reduction") else "left")
    for tap in info["taps"]:
        table.add_row(tap["key"], tap["module"], str(tap["channels"] or "–"),
                      f"/{tap['reduction']}" if tap["reduction"] else "–", "×".join(map(str, tap["shape"])))
    out_console.print(table)
    out_console.print("any other named module also works as module:<path> (feature:-1 is the last feature)",
                      highlight=False)


def _report_error(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


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
        _report_error(str(err))
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
