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
    """The gate's bounds, whether it passed, and one message per failed bound (both numbers in each)."""
    student = report["student"]["top1"]
    failures = []
    if (min_top1 is not None or max_drop is not None) and student is None:
        failures.append(f"student top-1 cannot be measured: its outputs are not finite on "
                        f"{report['student']['non_finite_outputs']} validation images")
    elif min_top1 is not None and student < min_top1:
        failures.append(f"student top-1 {student:.2f} < --min-top1 {min_top1:.2f}")
    if max_drop is not None and student is not None:
        teacher = report["teacher"]["top1"]
        if teacher is None:
            failures.append("teacher top-1 cannot be measured: its outputs are not finite")
        elif teacher - student > max_drop:
            failures.append(f"teacher top-1 {teacher:.2f} - student top-1 {student:.2f} = {teacher - student:.2f} "
                            f"points > --max-drop {max_drop:.2f}")
    return {"min_top1": min_top1, "max_drop": max_drop, "passed": not failures, "failures": failures}


def enforce(report: dict) -> None:
    """Raise QualityGateFailed (exit 1, carrying the report) when the report's gate failed."""
    gate = report.get("gate") or {}
    if gate.get("failures"):
        raise QualityGateFailed("quality gate failed: " + "; ".join(gate["failures"]), report)
