"""The quality gate: --min-top1 and --max-drop, checked after every output is written."""

from __future__ import annotations

from kdcli.errors import KdcliError, QualityGateFailed


def check_gate_options(min_top1: float | None, max_drop: float | None, has_teacher: bool) -> None:
    """Usage errors (exit 2), found before any work is done."""
    if min_top1 is not None and not 0 <= min_top1 <= 100:
        raise KdcliError(f"--min-top1 {min_top1:g}: a top-1 accuracy in percent, between 0 and 100")
    if max_drop is not None and not 0 <= max_drop <= 100:
        raise KdcliError(f"--max-drop {max_drop:g}: top-1 points the student may lose, between 0 and 100")
    if max_drop is not None and not has_teacher:
        raise KdcliError("--max-drop needs a teacher to compare with; pass --teacher, or use --min-top1")


def gate_result(report: dict, min_top1: float | None, max_drop: float | None) -> dict:
    """The gate's bounds, whether it passed, and one message per failed bound (both numbers in each). The bounds
    apply to the student and to every file exported from it (distill --export, kdcli export)."""
    checked = [("student", report["student"]["top1"])]
    checked += [(f"{e['format']} export", e["top1"]) for e in report.get("exports") or []]
    failures = []
    gated = min_top1 is not None or max_drop is not None
    teacher = (report.get("teacher") or {}).get("top1")
    if max_drop is not None and teacher is None:
        failures.append("teacher top-1 cannot be measured: its outputs are not finite")
    for what, top1 in checked:
        if gated and top1 is None:
            failures.append(f"{what} top-1 cannot be measured: its outputs are not finite on some validation images")
            continue
        if min_top1 is not None and top1 < min_top1:
            failures.append(f"{what} top-1 {top1:.2f} < --min-top1 {min_top1:.2f}")
        if max_drop is not None and teacher is not None and teacher - top1 > max_drop:
            failures.append(f"teacher top-1 {teacher:.2f} - {what} top-1 {top1:.2f} = {teacher - top1:.2f} "
                            f"points > --max-drop {max_drop:.2f}")
    return {"min_top1": min_top1, "max_drop": max_drop, "passed": not failures, "failures": failures}


def enforce(report: dict) -> None:
    """Raise QualityGateFailed (exit 1, carrying the report) when the report's gate failed."""
    gate = report.get("gate") or {}
    if gate.get("failures"):
        raise QualityGateFailed("quality gate failed: " + "; ".join(gate["failures"]), report)
