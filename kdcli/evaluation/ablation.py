"""The ablation's table: each cell's validation top-1 over seeds (mean ± sample standard deviation), its
difference from the student alone and from single-stage KD, and its training time; as report.json, report.md and
ablation.png."""

from __future__ import annotations

import statistics
from datetime import datetime, timezone
from pathlib import Path

from kdcli import __version__
from kdcli.evaluation.plots import _pyplot, _save
from kdcli.evaluation.report import REPORT_JSON, REPORT_MD
from kdcli.fsio import write_json, write_text

ABLATION_PNG = "ablation.png"
ABLATION_SCHEMA = 1


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _train_seconds(report: dict) -> float:
    return sum(stage["seconds"] for stage in report.get("stages", []))


def _teachers(runs: dict[str, list[tuple[int, dict]]]) -> list[dict]:
    """Each teacher's own validation top-1, as the teacher check measured it (the multi-teacher cell has all)."""
    for name in ("multi-teacher", "kd"):
        for _, report in runs.get(name, []):
            if report.get("teachers"):
                return report["teachers"]
            if report.get("teacher"):
                t = report["teacher"]
                return [{"ref": (report.get("plan") or {}).get("teacher", {}).get("ref"), "arch": t["arch"],
                         "top1": t["top1"], "weight": 1.0}]
    return []


def summarise(cells, runs: dict[str, list[tuple[int, dict]]], stage_rows: dict[int, str], inputs,
              seeds: list[int]) -> dict:
    rows = []
    for cell in cells:
        reports = runs[cell.name]
        top1 = [r["student"]["top1"] for _, r in reports]
        mean, std = _mean_std(top1)
        seconds = [_train_seconds(r) for _, r in reports]
        rows.append({
            "cell": cell.name, "what": cell.label, "recipe": cell.recipe.name, "epochs": cell.schedule,
            "anchor": [stage.anchor_weighting() for stage in cell.recipe.stages],
            "top1_mean": round(mean, 2), "top1_std": None if std is None else round(std, 2),
            "runs": [{"seed": seed, "top1": r["student"]["top1"], "train_seconds": round(_train_seconds(r), 1),
                      "folder": f"{cell.name}/seed-{seed}"} for seed, r in reports],
            "train_seconds_mean": round(statistics.fmean(seconds), 1),
        })
    by_name = {row["cell"]: row for row in rows}
    for row in rows:
        for ref in ("alone", "kd"):
            row[f"vs_{ref}"] = round(row["top1_mean"] - by_name[ref]["top1_mean"], 2) if ref in by_name else None
    first = next(iter(runs.values()))[0][1]
    return {
        "schema_version": ABLATION_SCHEMA,
        "kind": "ablate",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kdcli": __version__,
        "inputs": {**inputs.identity(), "recipe": {"name": inputs.base.name, "hash": inputs.base.digest()},
                   "seeds": seeds},
        "data": first["run"]["data"],
        "student": {"arch": first["student"]["arch"], "params": first["student"]["params"]},
        "teachers": _teachers(runs),
        "cells": rows,
        "stages": {str(k): v for k, v in stage_rows.items()},
        "best": max(rows, key=lambda row: row["top1_mean"])["cell"],
    }


def _pm(row: dict) -> str:
    return f"{row['top1_mean']:.2f}" + ("" if row["top1_std"] is None else f" ± {row['top1_std']:.2f}")


def _signed(x: float | None) -> str:
    return "–" if x is None else f"{x:+.2f}"


def render_markdown(summary: dict) -> str:
    inputs = summary["inputs"]
    teachers = ", ".join(f"{t['arch']} {t['top1']:.2f}%" + ("" if t["weight"] in (None, 1.0) else
                                                              f" (weight {t['weight']:g})")
                         for t in summary["teachers"] if t["ref"] != "ensemble")
    lines = [
        f"# Ablation: {summary['student']['arch']} from {teachers or 'no teacher'}",
        "",
        f"Data: {summary['data']}. Recipe: `{inputs['recipe']['name']}`; every cell at the same total epochs; "
        f"seeds {', '.join(map(str, inputs['seeds']))}; validation top-1 (%), mean ± sample std over the seeds; "
        "time = training seconds per run (mean).",
        "",
        "| cell | what | epochs | top-1 % | vs alone | vs KD | per seed | time |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for row in summary["cells"]:
        best = "**" if row["cell"] == summary["best"] else ""
        per_seed = " / ".join(f"{r['top1']:.2f}" for r in row["runs"])
        lines.append(f"| `{row['cell']}` | {row['what']} | {row['epochs']} | {best}{_pm(row)}{best} | "
                     f"{_signed(row['vs_alone'])} | {_signed(row['vs_kd'])} | {per_seed} | "
                     f"{row['train_seconds_mean']:.0f}s |")
    by_name = {row["cell"]: row for row in summary["cells"]}
    stages = [(k, name) for k, name in summary["stages"].items() if name in by_name]
    if stages:
        lines += ["", "Stages (same total epochs): " + "; ".join(
            f"{k} → {_pm(by_name[name])} (`{name}`)" for k, name in stages), ""]
    if summary["teachers"]:
        lines += ["Teachers (validation top-1 %): " + "; ".join(
            f"{t.get('ref') or t['arch']} ({t['arch']}) {t['top1']:.2f}"
            + ("" if t["weight"] is None else f", weight {t['weight']:g}") for t in summary["teachers"]), ""]
    lines += [f"Each run is an ordinary kdcli run in its folder (`CELL/seed-S`: report.json, report.md, the "
              f"student); ![ablation]({ABLATION_PNG})", ""]
    return "\n".join(lines)


def ablation_plot(summary: dict, path: Path) -> None:
    plt = _pyplot()
    rows = summary["cells"]
    figure, axis = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    axis.barh(ys, [r["top1_mean"] for r in rows], xerr=[r["top1_std"] or 0 for r in rows], color="#4c78a8",
              capsize=3)
    for y, row in zip(ys, rows):
        axis.scatter([r["top1"] for r in row["runs"]], [y] * len(row["runs"]), color="black", s=8, zorder=3)
    axis.set_yticks(ys, [r["cell"] for r in rows])
    low = min(r["top1"] for row in rows for r in row["runs"])
    axis.set_xlim(max(0.0, low - 5), min(100.0, max(r["top1_mean"] + (r["top1_std"] or 0) for r in rows) + 2))
    axis.set_xlabel("validation top-1 % (mean ± std; dots: seeds)")
    axis.set_title(f"{summary['student']['arch']}: ablation of {summary['inputs']['recipe']['name']}")
    _save(figure, path)


def write_ablation_report(out: Path, summary: dict) -> dict:
    ablation_plot(summary, out / ABLATION_PNG)
    summary = {**summary, "plots": {"ablation": ABLATION_PNG}}
    write_json(out / REPORT_JSON, summary)
    write_text(out / REPORT_MD, render_markdown(summary))
    return summary
