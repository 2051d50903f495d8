"""report.json (versioned, for machines) and report.md (the same, for people)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from kdcli.fsio import write_json, write_text

SCHEMA_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


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


def write_report(out: Path, report: dict) -> dict:
    """Stamp the schema version and time, write report.json and report.md into out."""
    report = {"schema_version": SCHEMA_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              **report}
    write_json(out / REPORT_JSON, report)
    write_text(out / REPORT_MD, render_markdown(report))
    return report


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.2f} MiB"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def render_markdown(report: dict) -> str:
    run, teacher, student = report["run"], report.get("teacher"), report["student"]
    title = "Distillation report" if report["kind"] == "distill" else "Training report"
    lines = [f"# {title}: {student['arch']}", ""]
    if teacher and teacher.get("top1"):
        kept = 100 * student["top1"] / teacher["top1"]
        ratio = teacher["params"] / student["params"]
        lines += [
            f"The student keeps **{kept:.1f}%** of the teacher's top-1 ({_pct(student['top1'])} vs "
            f"{_pct(teacher['top1'])}) with **{ratio:.1f}×** fewer parameters.",
            "",
        ]
    lines += ["| model | arch | top-1 | top-5 | params | file |", "|---|---|---:|---:|---:|---:|"]
    for role, entry in (("teacher", teacher), ("student", student)):
        if entry:
            lines.append(
                f"| {role} | {entry['arch']} | {_pct(entry['top1'])} | {_pct(entry['top5'])} | "
                f"{entry['params'] / 1e6:.3f} M | {_mib(entry['file_bytes'])} |"
            )
    lines += ["", "## Stages", "", "| # | stage | epochs | anchor | student top-1 after | time |",
              "|---:|---|---:|---|---:|---:|"]
    for i, stage in enumerate(report["stages"]):
        lines.append(
            f"| {i} | {stage['name']} | {stage['epochs']} | {stage['anchor']} | {_pct(stage['val_top1'])} | "
            f"{stage['seconds']:.1f} s |"
        )
    recipe = report["recipe"]
    lines += [
        "",
        "## Run",
        "",
        f"- recipe: `{recipe['name']}` (hash `{recipe['hash']}`; the full recipe is in `recipe.yaml`)",
        f"- data: {run['data']}, input {run['data_config']['input_size'][-1]} px",
        f"- device: {run['device']} ({run['threads']} threads), seed {run['seed']}, {run['seconds']:.1f} s in all",
        f"- kdcli {run['kdcli']}, torch {run['torch']}, timm {run['timm']}",
        f"- command: `{' '.join(run['command'])}`",
        "",
    ]
    return "\n".join(lines)
