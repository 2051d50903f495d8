#!/usr/bin/env bash
# One CI job from teacher to deployable files: distill, export to ONNX and int8, and fail the job when the student
# or any exported file loses too much accuracy against the teacher (the gate applies to every exported file).
#
# Needs the export extra: pip install "kdcli[export]".
# Exit code: 0 every model passed the gate, 1 the gate failed (everything is still written), 2 bad input,
# 130 interrupted.
#
#   TEACHER=models/teacher DATA=/data/imagenette STUDENT=mobilenetv3_small_100 MAX_DROP=2 ./compress-export.sh
set -euo pipefail

DATA="${DATA:-synthetic}"                  # ImageFolder root (train/, val/), CIFAR python folder, or synthetic
TEACHER="${TEACHER:?set TEACHER to the teacher checkpoint (.safetensors or timm folder)}"
STUDENT="${STUDENT:-test_resnet}"          # a timm architecture name
RECIPE="${RECIPE:-smskd}"                  # built-in recipe name or YAML file
EXPORT="${EXPORT:-onnx,int8}"              # any of onnx, int8, fp16, bf16
MAX_DROP="${MAX_DROP:-2}"                  # gate: top-1 points the student and each exported file may lose
MIN_TOP1="${MIN_TOP1:-}"                   # gate: optional floor on top-1 (%) of the student and each file
OUT="${OUT:-kdcli-out}"                    # $OUT/{student/, export/model.onnx, export/model.int8.onnx, report.*}
KDCLI_ARGS="${KDCLI_ARGS:-}"               # extra distill arguments, e.g. "--set stages.0.epochs=2"
read -r -a KDCLI <<< "${KDCLI:-kdcli}"     # how to run kdcli, e.g. "python -m kdcli"
read -r -a EXTRA <<< "$KDCLI_ARGS"

gate=(--max-drop "$MAX_DROP")
[[ -n "$MIN_TOP1" ]] && gate+=(--min-top1 "$MIN_TOP1")

status=0
"${KDCLI[@]}" distill "$TEACHER" "$STUDENT" --data "$DATA" --recipe "$RECIPE" --out "$OUT" --force \
  --export "$EXPORT" "${gate[@]}" ${EXTRA[@]+"${EXTRA[@]}"} || status=$?

if [[ -f "$OUT/report.md" && -n "${GITHUB_STEP_SUMMARY:-}" ]]; then
  cat "$OUT/report.md" >> "$GITHUB_STEP_SUMMARY"  # the report, with one table per exported file
fi
case "$status" in
  0) echo "student and exports passed: $OUT/export/ (report: $OUT/report.md)" ;;
  1) echo "quality gate failed: see which model missed it in $OUT/report.md" >&2 ;;
  *) echo "kdcli failed with exit code $status" >&2 ;;
esac
exit "$status"
