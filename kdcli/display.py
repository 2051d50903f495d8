"""Terminal output of the commands (rich tables on stdout); no logic beyond formatting."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdcli.evaluation.report import ROLES, headline, role_name, signed

out_console = Console()


def _cell(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _speed(measured: dict, digits: int, key: str) -> str:
    """A reliable figure, or 'not reliable' (report.md says why)."""
    return _cell(measured[key], digits) if measured["reliable"] else "not reliable"


def _latency(latency: dict) -> str:
    if not latency["reliable"]:
        return "not reliable"
    return f"{latency['median_ms']:.3f} ({latency['p10_ms']:.3f}–{latency['p90_ms']:.3f})"


def _runtime(entry: dict) -> str:
    return f"{entry['runtime'].split(' (')[0].split('+')[0]}, {entry['threads']} thr"


def _unreliable_note(entries: list[dict]) -> None:
    if any(not (e["latency"]["reliable"] and e["throughput"]["reliable"]) for e in entries):
        out_console.print("not reliable: speed not measurable reliably here (the median did not settle, or p90 > 1.5× "
                          "the median: the machine is busy); report.md says why for each", markup=False,
                          highlight=False, soft_wrap=True)


def model_table(title: str, report: dict) -> Table:
    """One column per model (student, teacher, baseline), one row per metric and cost."""
    roles = [role for role in ROLES if report.get(role)]
    entries = [report[role] for role in roles]
    table = Table(title=title)
    table.add_column("")
    for role in roles:
        table.add_column(role_name(report, role), justify="right")
    rows = [
        ("arch", [e["arch"] for e in entries]),
        ("top-1 %", [_cell(e["top1"]) for e in entries]),
        ("top-5 %", [_cell(e["top5"]) for e in entries]),
        ("NLL", [_cell(e["nll"], 4) for e in entries]),
        ("ECE %", [_cell(e["ece"]) for e in entries]),
        ("params", [f"{e['params'] / 1e6:.3f} M" for e in entries]),
        ("file", [f"{e['file_bytes'] / 2**20:.2f} MiB" if e.get("file_bytes") else "–" for e in entries]),
        ("MACs / image", [f"{e['macs'] / 1e6:.2f} M" for e in entries]),
        ("latency, batch 1, ms (p10–p90)", [_latency(e["latency"]) for e in entries]),
        (f"img/s, batch {entries[0]['throughput']['batch']}",
         [_speed(e["throughput"], 0, "images_per_s") for e in entries]),
        ("format, runtime", [f"{e['format']}, {_runtime(e)}" for e in entries]),
    ]
    comparison = report.get("comparison") or {}
    if comparison.get("agreement") is not None:
        rows.append(("agreement with teacher %", [_cell(comparison["agreement"])] + [""] * (len(roles) - 1)))
    for name, values in rows:
        table.add_row(name, *values)
    return table


def _summary(report: dict) -> None:
    out_console.print(headline(report).replace("**", ""), markup=False, highlight=False, soft_wrap=True)
    gate = report.get("gate") or {}
    if gate.get("min_top1") is not None or gate.get("max_drop") is not None:
        out_console.print("quality gate: " + ("passed" if gate["passed"] else "failed"), markup=False)


def print_run(report: dict, out: Path) -> None:
    out_console.print(model_table("Result", report))
    stages = Table(title="Stages")
    for column in ("#", "stage", "epochs", "anchor", "top-1 after %", "time"):
        stages.add_column(column, justify="left" if column in ("stage", "anchor") else "right")
    for i, stage in enumerate(report["stages"]):
        stages.add_row(str(i), stage["name"], str(stage["epochs"]), stage["anchor"], f"{stage['val_top1']:.2f}",
                       f"{stage['seconds']:.1f}s")
    out_console.print(stages)
    if report.get("exports"):
        out_console.print(export_table(report))
    _unreliable_note([report[role] for role in ROLES if report.get(role)] + report.get("exports", []))
    _summary(report)
    where = out / "student" if report["kind"] == "distill" else out
    out_console.print(f"{role_name(report, 'student')} written to {where}; report in {out / 'report.md'}",
                      markup=False)


def export_table(report: dict) -> Table:
    """One column per exported file beside the fp32 student: size, accuracy, agreement, speed."""
    student, exports = report["student"], report["exports"]
    table = Table(title="Exports, checked against the fp32 student on the validation split")
    table.add_column("")
    for column in ("fp32 student", *(e["format"] for e in exports)):
        table.add_column(column, justify="right")
    agree_teacher = (report["comparison"] or {}).get("agreement")
    rows = [
        ("file", [Path(student["path"]).name, *(Path(e["path"]).name for e in exports)]),
        ("size", [f"{student['file_bytes'] / 2**20:.2f} MiB", *(f"{e['file_bytes'] / 2**20:.2f} MiB" for e in exports)]),
        ("top-1 %", [_cell(student["top1"]), *(_cell(e["top1"]) for e in exports)]),
        ("Δ top-1 vs fp32", ["", *(signed(-e["drop_vs_fp32"]) for e in exports)]),
        ("max |Δlogit| vs fp32", ["", *(f"{e['max_abs_logit_diff']:.2e}" for e in exports)]),
        ("agreement with fp32 %", ["", *(_cell(e["agreement_fp32"]) for e in exports)]),
        ("agreement with teacher %", [_cell(agree_teacher), *(_cell(e["agreement_teacher"]) for e in exports)]),
        ("latency, batch 1, ms (p10–p90)", [_latency(student["latency"]), *(_latency(e["latency"]) for e in exports)]),
        (f"img/s, batch {student['throughput']['batch']}",
         [_speed(student["throughput"], 0, "images_per_s"), *(_speed(e["throughput"], 0, "images_per_s")
                                                             for e in exports)]),
        ("runtime", [_runtime(student), *(_runtime(e) for e in exports)]),
    ]
    for name, values in rows:
        table.add_row(name, *values)
    return table


def print_export(report: dict, out: Path) -> None:
    if "run" not in report:  # no --data: the logit check on random inputs only
        table = Table(title=f"Exports of {report['student']}, checked on {report['exports'][0]['checked_on']}")
        for column in ("format", "file", "max |Δlogit| vs fp32", "agreement with fp32 %", "runtime"):
            table.add_column(column, justify="left" if column in ("format", "file", "runtime") else "right")
        for e in report["exports"]:
            table.add_row(e["format"], e["path"], f"{e['max_abs_logit_diff']:.2e}", _cell(e["agreement_fp32"]),
                          e["runtime"])
        out_console.print(table)
        out_console.print(f"files in {out}; pass --data to measure top-1, agreement and speed on the validation split",
                          markup=False, highlight=False, soft_wrap=True)
        return
    out_console.print(export_table(report))
    _unreliable_note([report["student"], *report["exports"]])
    _summary(report)
    out_console.print(f"files and report in {out} ({out / 'report.md'})", markup=False, highlight=False,
                      soft_wrap=True)


def print_eval(report: dict, checkpoint: str, out: Path | None) -> None:
    out_console.print(model_table(f"Evaluation on {report['run']['data']}", report))
    _unreliable_note([report[role] for role in ROLES if report.get(role)])
    _summary(report)
    if out is not None:
        out_console.print(f"report in {out / 'report.md'}", markup=False)


def print_demo(reports: dict, out: Path) -> None:
    table = Table(title=f"kdcli demo: {reports['teacher']['run']['data']}")
    for column in ("model", "arch", "recipe", "epochs", "top-1 %", "params", "time"):
        table.add_column(column, justify="left" if column in ("model", "arch", "recipe") else "right", no_wrap=True)
    for label, report in reports.items():
        entry = report["student"]
        epochs = "+".join(str(stage["epochs"]) for stage in report["stages"])
        table.add_row(label, entry["arch"], report["recipe"]["name"], epochs, f"{entry['top1']:.2f}",
                      f"{entry['params'] / 1e6:.2f} M", f"{report['run']['seconds']:.0f}s")
    out_console.print(table)
    distilled = reports["distilled"]
    out_console.print(headline(distilled).replace("**", ""), markup=False, highlight=False, soft_wrap=True)
    gain = distilled["student"]["top1"] - reports["baseline"]["student"]["top1"]
    out_console.print(f"distillation vs the same student alone: {gain:+.2f} top-1 points; outputs in {out}",
                      markup=False, highlight=False, soft_wrap=True)


def print_ablation(summary: dict, out: Path) -> None:
    seeds = len(summary["inputs"]["seeds"])
    table = Table(title=f"kdcli ablate: {summary['student']['arch']} on {summary['data']}, {seeds} seed(s)")
    for column in ("cell", "epochs", "top-1 %", "vs alone", "vs KD", "time"):
        table.add_column(column, justify="left" if column in ("cell", "epochs") else "right", no_wrap=True)
    for row in summary["cells"]:
        top1 = f"{row['top1_mean']:.2f}" + ("" if row["top1_std"] is None else f" ± {row['top1_std']:.2f}")
        signed = ["–" if row[k] is None else f"{row[k]:+.2f}" for k in ("vs_alone", "vs_kd")]
        table.add_row(row["cell"], row["epochs"], top1, *signed, f"{row['train_seconds_mean']:.0f}s")
    out_console.print(table)
    teachers = "; ".join(f"{t['arch']} {t['top1']:.2f}%" for t in summary["teachers"])
    if teachers:
        out_console.print(f"teacher top-1: {teachers}", markup=False, highlight=False, soft_wrap=True)
    out_console.print(f"best: {summary['best']}; report in {out / 'report.md'}", markup=False, highlight=False,
                      soft_wrap=True)


def print_methods(rows: list[dict]) -> None:
    from kdcli.models.inspection import brief

    table = Table(title="KD methods (recipe: losses: [{method: NAME, weight: W, ...}])")
    for column, ratio in (("method", 1), ("what", 4), ("parameters (defaults)", 4), ("reads", 2)):
        table.add_column(column, ratio=ratio, no_wrap=column == "method")
    for row in rows:
        params = ", ".join(f"{k}={brief(v['default'])}" for k, v in row["parameters"].items())
        table.add_row(*(Text(cell) for cell in (row["name"], row["summary"], params, row["reads"])))
    out_console.print(table)


def print_inspection(info: dict) -> None:
    source = info["init"] if info["from_file"] else "random init"
    out_console.print(f"[bold]{info['arch']}[/bold] ({source}): {info['params'] / 1e6:.3f} M params, "
                      f"{info['bytes'] / 2**20:.2f} MiB, {info['num_classes']} classes", highlight=False)
    for line in _preprocessing_lines(info["preprocessing"]):
        out_console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    table = Table(title="taps (recipe: {feature: N}, {module: PATH} or penultimate)")
    for column in ("tap", "module path", "channels", "reduction", f"shape at {info['image_size']}"):
        table.add_column(column, justify="right" if column in ("channels", "reduction") else "left")
    for tap in info["taps"]:
        table.add_row(tap["key"], tap["module"], str(tap["channels"] or "–"),
                      f"/{tap['reduction']}" if tap["reduction"] else "–", "×".join(map(str, tap["shape"])))
    out_console.print(table)
    out_console.print("any other named module also works as module:<path> (feature:-1 is the last feature)",
                      highlight=False)


def _preprocessing_lines(pre: dict) -> list[str]:
    size = pre["input_size"][-1]
    mean, std = (",".join(f"{v:g}" for v in pre[k]) for k in ("mean", "std"))
    lines = [f"input {size}x{size} {pre['interpolation']}, crop {pre['crop_pct']:g} {pre['crop_mode']}, "
             f"mean {mean}, std {std}"]
    by_source: dict[str, list[str]] = {}
    for name, source in pre["sources"].items():
        by_source.setdefault(source, []).append(name)
    lines.append("from: " + "; ".join(f"{', '.join(names)}: {source}" for source, names in by_source.items()))
    if pre["guessed"]:
        lines.append(f"guessed (no flag or file states them): {', '.join(pre['guessed'])}")
    return lines


def print_plan(plan: dict, stderr: bool = False) -> None:
    """The run plan as lines: models, init, preprocessing and where each value came from, data, steps, time."""
    console = Console(stderr=True) if stderr else out_console
    say = lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    recipe = plan["recipe"]
    say(f"plan: {plan['kind']} with recipe {recipe['name']}: {', '.join(recipe['stages'])}")
    data = plan["data"]
    say(f"  data     {data['description']}" + (f"; images {data['image_sizes']}" if data["image_sizes"] else ""))
    for role in ("teacher", "student"):
        entry = plan[role]
        if entry is None:
            continue
        label = "model" if role == "student" and plan["kind"] == "train" else role
        say(f"  {label:<8} {entry['arch']} ({entry['ref']}): {entry['classes']} classes, "
            f"{entry['params'] / 1e6:.2f} M params; init: {entry['init']}")
        for line in _preprocessing_lines(entry["preprocessing"]):
            say(f"           {line}")
        if role == "teacher":
            check = entry["check"]
            if check:
                say(f"           val top-1 {check['top1']:.1f}% (chance {check['chance']:.1f}%, needs "
                    f"{check['threshold']:.1f}%): {check['result']}")
            say(f"           gets {entry['input']}")
    for number, teacher in enumerate(plan.get("teachers") or []):
        which = "ensemble" if teacher["weight"] is None else f"teacher.{number}"
        weight = "" if teacher["weight"] is None else f", logit weight {teacher['weight']:g}"
        say(f"  {which:<8} {teacher['arch']} ({teacher['ref']}): val top-1 {teacher['top1']:.1f}%{weight}")
    pipeline = plan.get("pipeline")
    if pipeline:
        say(f"  images   decoded {pipeline['decoded']}; {pipeline['workers']} loader workers; views "
            f"{pipeline['views']}; stored outputs: {pipeline['cache']}")
    steps = plan["steps"]
    shared = steps.get("processes", 1)
    split = f" (the global batch: {shared} processes x {steps['batch_size'] // shared})" if shared > 1 else ""
    say(f"  steps    {steps['per_epoch']} per epoch x {steps['epochs']} epochs = {steps['total']} steps of "
        f"{steps['batch_size']} images{split}")
    estimate = plan["estimate"]
    say(f"  time     about {_duration(estimate['seconds'])} on {estimate['device']} ({estimate['threads']} threads, "
        f"{estimate.get('precision', 'fp32')}{', channels-last' if estimate.get('layout') == 'channels-last' else ''}; "
        "a rough estimate from timed forward passes)")
    for note in plan["notes"]:
        say(f"  note     {note}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def print_conversion(summary: dict, checkpoint: str, out: Path) -> None:
    say = lambda text: out_console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"converted {summary['tensors']} tensors from {summary['weights_at']} of {checkpoint}: {summary['arch']} "
        f"(from {summary['arch_from']}), {summary['num_classes']} classes, {summary['params'] / 1e6:.3f} M params "
        f"-> {out}")
    for line in _preprocessing_lines(summary["preprocessing"]):
        say(f"  {line}")
    if summary["also_in_file"]:
        say(f"  the file also holds {', '.join(summary['also_in_file'])} (--ema takes the EMA weights)")
    say(f"use it: kdcli distill {out} STUDENT --data DIR   or   timm.create_model('local-dir:{out}', pretrained=True)")
