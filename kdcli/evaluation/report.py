"""report.json (versioned, validated by report.schema.json), report.md (the same, for people) and its plots."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from kdcli.fsio import write_json, write_text
from kdcli.evaluation.plots import RELIABILITY_PNG, TRAINING_PNG, reliability_plot, training_plot

SCHEMA_VERSION = 2
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
ROLES = ("student", "teacher", "baseline")


def report_schema() -> dict:
    """The JSON Schema report.json follows (shipped in the package)."""
    return json.loads(resources.files("kdcli.evaluation").joinpath("report.schema.json").read_text(encoding="utf-8"))


def stage_entry(outcome) -> dict:
    return {
        "name": outcome.name,
        "epochs": outcome.epochs,
        "anchor": outcome.anchor,
        "seconds": round(outcome.seconds, 2),
        "val_top1": outcome.val_top1,
        "history": [
            {
                "epoch": r.epoch,
                "train_loss": r.train_loss,
                "terms": r.terms,
                "val_top1": r.val_top1,
                "lr": r.lr,
                "seconds": round(r.seconds, 2),
            }
            for r in outcome.history
        ],
    }


def stamp(report: dict) -> dict:
    """The report with its schema version and creation time first."""
    return {"schema_version": SCHEMA_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **report}


def write_report(out: Path, report: dict) -> dict:
    """Write the plots, report.json and report.md into out; returns the report as written."""
    out.mkdir(parents=True, exist_ok=True)
    plots = {"training": None, "reliability": RELIABILITY_PNG}
    if report.get("stages"):
        training_plot(report["stages"], out / TRAINING_PNG)
        plots["training"] = TRAINING_PNG
    reliability_plot({role: report[role]["reliability"] for role in ROLES if report.get(role)}, out / RELIABILITY_PNG)
    report = {**report, "plots": plots}
    write_json(out / REPORT_JSON, report)
    write_text(out / REPORT_MD, render_markdown(report))
    return report


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.2f} MiB"


def _num(x: float | None, digits: int = 2, suffix: str = "") -> str:
    return "–" if x is None else f"{x:.{digits}f}{suffix}"


def _count(n: int | None) -> str:
    if n is None:
        return "–"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _times(ratio: float, better: str, worse: str) -> str:
    """'**5.2×** fewer parameters' for a ratio of 5.2, '**2.0×** more parameters' for 0.5."""
    return f"**{ratio:.1f}×** {better}" if ratio >= 1 else f"**{1 / ratio:.1f}×** {worse}"


def headline(report: dict) -> str:
    """'The student keeps 97.4% of teacher top-1 with 5.2× fewer parameters, 3.1× faster at batch 1.'"""
    student, teacher, baseline, c = report["student"], report.get("teacher"), report.get("baseline"), report["comparison"]
    if student["top1"] is None:
        return (f"The student's outputs are not finite (NaN or infinite) on {student['non_finite_outputs']} of "
                f"{report['evaluation']['samples']} validation images: its accuracy cannot be measured.")
    if teacher and c["retention"] is not None:
        text = (f"The student keeps **{c['retention']:.1f}%** of teacher top-1 ({student['top1']:.2f} vs "
                f"{teacher['top1']:.2f})")
        costs = []
        if c["param_ratio"]:
            costs.append(_times(c["param_ratio"], "fewer parameters", "more parameters"))
        if c["speedup"]:
            costs.append(_times(c["speedup"], "faster at batch 1", "slower at batch 1"))
        text += " with " + ", ".join(costs) if costs else ""
    else:
        text = f"The student ({student['arch']}) reaches **{student['top1']:.2f}%** top-1"
    if baseline and c["gain"]["top1"] is not None:
        gain = c["gain"]["top1"]
        text += f"; {abs(gain):.2f} top-1 points {'above' if gain >= 0 else 'below'} the baseline ({baseline['top1']:.2f})"
    return text + "."


def _metric_rows(report: dict, roles: list[str]) -> list[str]:
    entries, c = [report[r] for r in roles], report["comparison"]
    rows = [
        ("architecture", [e["arch"] for e in entries]),
        ("top-1 (%)", [_num(e["top1"]) for e in entries]),
        ("top-5 (%)", [_num(e["top5"]) for e in entries]),
        ("NLL", [_num(e["nll"], 4) for e in entries]),
        ("ECE (%, 15 bins)", [_num(e["ece"]) for e in entries]),
    ]
    if report.get("teacher"):
        rows.append(("agreement with teacher (%)", [_num(c["agreement"]), "–"] + ["–"] * (len(roles) - 2)))
        rows.append(("retention of teacher top-1 (%)", [_num(c["retention"], 1)] + ["–"] * (len(roles) - 1)))
    if report.get("baseline"):
        gain = c["gain"]["top1"]
        rows.append(("student gain, top-1 points", ["–" if gain is None else f"{gain:+.2f}"] + ["–"] * (len(roles) - 1)))
    return [f"| {name} | " + " | ".join(values) + " |" for name, values in rows]


def _cost_rows(report: dict, roles: list[str]) -> list[str]:
    entries = [report[r] for r in roles]
    rows = [
        ("parameters", [_count(e["params"]) for e in entries]),
        ("file size", [_mib(e["file_bytes"]) for e in entries]),
        ("input size (px)", [str(e["input_size"]) for e in entries]),
        ("MACs per image", [_count(e["macs"]) for e in entries]),
        ("latency, batch 1, median (ms)", [_num(e["latency"]["median_ms"], 3) for e in entries]),
        ("latency, batch 1, p90 (ms)", [_num(e["latency"]["p90_ms"], 3) for e in entries]),
        (f"throughput, batch {entries[0]['throughput']['batch']} (img/s)",
         [_num(e["throughput"]["images_per_s"], 0) for e in entries]),
    ]
    return [f"| {name} | " + " | ".join(values) + " |" for name, values in rows]


def _ratios(c: dict) -> str:
    parts = [(c["param_ratio"], "fewer parameters"), (c["size_ratio"], "smaller file"), (c["macs_ratio"], "fewer MACs"),
             (c["speedup"], "faster at batch 1"), (c["throughput_ratio"], "the teacher's throughput")]
    return ", ".join(f"{value:.2f}× {what}" for value, what in parts if value)


def render_markdown(report: dict) -> str:
    run, student = report["run"], report["student"]
    roles = [r for r in ROLES if report.get(r)]
    title = {"distill": "Distillation report", "train": "Training report", "eval": "Evaluation report"}[report["kind"]]
    lines = [f"# {title}: {student['arch']}", "", headline(report), ""]
    gate = report.get("gate")
    if gate and (gate["min_top1"] is not None or gate["max_drop"] is not None):
        verdict = "**passed**" if gate["passed"] else "**failed**: " + "; ".join(gate["failures"])
        bounds = ", ".join(f"--{k.replace('_', '-')} {gate[k]:.2f}" for k in ("min_top1", "max_drop")
                           if gate[k] is not None)
        lines += [f"Quality gate ({bounds}): {verdict}", ""]
    if report.get("stages"):
        lines += ["## Stages", "", "| # | stage | epochs | anchor | student top-1 after (%) | wall time |",
                  "|---:|---|---:|---|---:|---:|"]
        for i, stage in enumerate(report["stages"]):
            lines.append(f"| {i} | {stage['name']} | {stage['epochs']} | {stage['anchor']} | "
                         f"{_num(stage['val_top1'])} | {stage['seconds']:.1f} s |")
        lines.append("")
    evaluation = report["evaluation"]
    header = "| metric | " + " | ".join(roles) + " |"
    rule = "|---|" + "---:|" * len(roles)
    lines += ["## Metrics", "", f"On the validation split ({evaluation['samples']} images of {run['data']}).", "",
              header, rule, *_metric_rows(report, roles), "",
              "## Cost", "", f"Measured on {evaluation['device']}, threads: {evaluation['threads']}; "
              f"latency after {student['latency']['warmup']} warm-up runs over {student['latency']['runs']} runs.",
              "", header.replace("metric", "cost"), rule, *_cost_rows(report, roles), ""]
    if report.get("teacher") and _ratios(report["comparison"]):
        lines += [f"Against the teacher: {_ratios(report['comparison'])}.", ""]
    plots = report.get("plots") or {}
    if plots.get("training") or plots.get("reliability"):
        lines += ["## Plots", ""]
        if plots.get("training"):
            lines += [f"![validation top-1 and training loss per epoch]({plots['training']})", ""]
        if plots.get("reliability"):
            lines += [f"![reliability diagram]({plots['reliability']})", ""]
    lines += ["## Run", ""]
    recipe = report.get("recipe")
    if recipe:
        lines.append(f"- recipe: `{recipe['name']}` (hash `{recipe['hash']}`; the full recipe is in `recipe.yaml`)")
    if report["student"].get("init"):
        lines.append(f"- student init: {report['student']['init']}")
    check = ((report.get("plan") or {}).get("teacher") or {}).get("check")
    if check:  # the teacher check of the run plan (jobs/plan.py)
        lines.append(f"- teacher check: validation top-1 {check['top1']:.1f}% against chance {check['chance']:.1f}% "
                     f"(needs {check['threshold']:.1f}%): {check['result']}")
    seed = f", seed {run['seed']}" if run.get("seed") is not None else ""
    lines += [
        f"- data: {run['data']}, input {run['data_config']['input_size'][-1]} px",
        f"- device: {run['device']} (threads: {run['threads']}){seed}, {run['seconds']:.1f} s in all",
        f"- kdcli {run['kdcli']}, torch {run['torch']}, timm {run['timm']}",
        f"- command: `{' '.join(run['command'])}`",
        "",
    ]
    return "\n".join(lines)
