#!/usr/bin/env bash
# Compress an image classifier with kdcli and fail the CI job when the student is not good enough.
#
# Copy this file into your repository and set the variables below (or pass them as environment variables).
# Exit code: 0 the student passed the quality gate, 1 the gate failed (the report is still written),
# 2 bad input (a wrong path, a bad recipe, ...), 130 interrupted.
#
#   TEACHER=models/teacher DATA=/data/imagenette STUDENT=resnet18 MIN_TOP1=85 MAX_DROP=2 ./compress.sh
set -euo pipefail

DATA="${DATA:-synthetic}"                  # ImageFolder root (train/, val/), CIFAR python folder, or synthetic
TEACHER="${TEACHER:-}"                     # teacher checkpoint (.safetensors or timm folder); empty: train one
TEACHER_ARCH="${TEACHER_ARCH:-resnet10t}"  # architecture of the teacher trained when TEACHER is empty
TEACHER_EPOCHS="${TEACHER_EPOCHS:-5}"
STUDENT="${STUDENT:-test_resnet}"          # a timm architecture name
RECIPE="${RECIPE:-kd-anchored}"            # built-in recipe name or YAML file
BASELINE="${BASELINE:-}"                   # optional: the student trained without KD, for the report's comparison
MIN_TOP1="${MIN_TOP1:-}"                   # gate: the student's top-1 (%) must be at least this
MAX_DROP="${MAX_DROP:-}"                   # gate: the student may lose at most this many top-1 points
OUT="${OUT:-kdcli-out}"                    # outputs: $OUT/distill/{student/,report.md,report.json,*.png}
KDCLI_ARGS="${KDCLI_ARGS:-}"               # extra distill arguments, e.g. "--set stages.0.epochs=2"
read -r -a KDCLI <<< "${KDCLI:-kdcli}"     # how to run kdcli, e.g. "python -m kdcli"
read -r -a EXTRA <<< "$KDCLI_ARGS"

if [[ -z "$TEACHER" ]]; then
  echo "training a ${TEACHER_ARCH} teacher for ${TEACHER_EPOCHS} epochs on ${DATA}"
  "${KDCLI[@]}" train "$TEACHER_ARCH" --data "$DATA" --epochs "$TEACHER_EPOCHS" --out "$OUT/teacher" --force
  TEACHER="$OUT/teacher"
fi

gate=()
[[ -n "$MIN_TOP1" ]] && gate+=(--min-top1 "$MIN_TOP1")
[[ -n "$MAX_DROP" ]] && gate+=(--max-drop "$MAX_DROP")
[[ -n "$BASELINE" ]] && gate+=(--baseline "$BASELINE")

status=0
"${KDCLI[@]}" distill "$TEACHER" "$STUDENT" --data "$DATA" --recipe "$RECIPE" --out "$OUT/distill" --force \
  ${gate[@]+"${gate[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} || status=$?

if [[ -f "$OUT/distill/report.md" && -n "${GITHUB_STEP_SUMMARY:-}" ]]; then
  # the report on the job's summary page; a summary cannot show the plots beside it: they are in the artifact
  sed -E 's/^!\[(.*)\]\((.*)\)$/*\1: `\2` in the kdcli-report artifact*/' "$OUT/distill/report.md" >> "$GITHUB_STEP_SUMMARY"
fi
case "$status" in
  0) echo "student passed: $OUT/distill/student (report: $OUT/distill/report.md)" ;;
  1) echo "quality gate failed: the student is not good enough; see $OUT/distill/report.md" >&2 ;;
  *) echo "kdcli failed with exit code $status" >&2 ;;
esac
exit "$status"
