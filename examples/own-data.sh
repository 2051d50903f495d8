#!/usr/bin/env bash
# Your own images to a small, checked, exported classifier, end to end:
#   1. a teacher: yours (a timm folder, .safetensors, hf-hub:ORG/NAME, or a .pth/.ckpt converted here), or one
#      trained here;
#   2. a baseline: the student trained alone, what distillation must beat;
#   3. the distilled student, compared with both, exported (ONNX by default);
#   4. the student and its export evaluated on the held-out test/ split, if DATA has one, with a quality gate.
#
# DATA is an ImageFolder root: DATA/train/<class>/*.jpg, DATA/val/<class>/*.jpg, optionally DATA/test/<class>/*.
#
#   DATA=~/data/flowers ./own-data.sh                                       # trains a resnet50 teacher first
#   DATA=~/data/flowers TEACHER=models/teacher STUDENT=resnet18 ./own-data.sh
#   DATA=~/data/flowers TEACHER=output/train/model_best.pth.tar ./own-data.sh  # a timm train.py checkpoint
#
# Everything lands in $OUT: teacher/ (if trained or converted), baseline/, distill/ (student/, export/, reports,
# metrics.jsonl), test/ and test-export/ (the held-out reports). Exit code: 0 ok, 1 the gate failed, 2 bad input.
set -euo pipefail

DATA="${DATA:?set DATA to your ImageFolder root (train/ and val/ inside)}"
TEACHER="${TEACHER:-}"                     # empty: train TEACHER_ARCH on DATA first
TEACHER_ARCH="${TEACHER_ARCH:-resnet50}"   # the teacher to train, or the architecture of a .pth/.ckpt to convert
TEACHER_EPOCHS="${TEACHER_EPOCHS:-30}"
STUDENT="${STUDENT:-mobilenetv3_small_100}"  # a timm name; NAME.TAG (e.g. resnet18.a1_in1k) starts from pretrained weights
RECIPE="${RECIPE:-smskd}"                  # kdcli recipe list
BASELINE_EPOCHS="${BASELINE_EPOCHS:-12}"   # as many epochs as the recipe's stages together (smskd: 8+2+2)
EXPORT="${EXPORT:-onnx}"                   # onnx, int8, fp16, bf16 (comma-separated; onnx/int8 need kdcli[export]); empty: none
MIN_TOP1="${MIN_TOP1:-0}"                  # gate on the held-out test split: the student's top-1 (%) at least this
OUT="${OUT:-kdcli-own}"
TRAIN_ARGS="${TRAIN_ARGS:-}"               # extra arguments for both trainings, e.g. "--set data.batch_size=32"
DISTILL_ARGS="${DISTILL_ARGS:-}"           # extra distill arguments, e.g. "--set stages.0.epochs=4"
read -r -a KDCLI <<< "${KDCLI:-kdcli}"     # how to run kdcli, e.g. "python -m kdcli"
read -r -a TRAIN_EXTRA <<< "$TRAIN_ARGS"
read -r -a DISTILL_EXTRA <<< "$DISTILL_ARGS"

# 1. the teacher
case "$TEACHER" in
  "")
    "${KDCLI[@]}" train "$TEACHER_ARCH" --data "$DATA" --epochs "$TEACHER_EPOCHS" --out "$OUT/teacher" --force \
      ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
    TEACHER="$OUT/teacher" ;;
  *.pth|*.pth.tar|*.pt|*.bin|*.ckpt)  # a training checkpoint: converted to a timm folder, never unpickled
    "${KDCLI[@]}" convert "$TEACHER" --arch "$TEACHER_ARCH" --out "$OUT/teacher" --force
    TEACHER="$OUT/teacher" ;;
esac

# 2. the baseline: the same student without a teacher
"${KDCLI[@]}" train "$STUDENT" --data "$DATA" --epochs "$BASELINE_EPOCHS" --out "$OUT/baseline" --force \
  ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}

# 3. distil, compare with the teacher and the baseline, export
export_args=()
[[ -n "$EXPORT" ]] && export_args=(--export "$EXPORT")
"${KDCLI[@]}" distill "$TEACHER" "$STUDENT" --data "$DATA" --recipe "$RECIPE" --baseline "$OUT/baseline" \
  --out "$OUT/distill" --force ${export_args[@]+"${export_args[@]}"} ${DISTILL_EXTRA[@]+"${DISTILL_EXTRA[@]}"}

# 4. the held-out test split: images no training step and no choice above has seen
if [[ -d "$DATA/test" ]]; then
  "${KDCLI[@]}" eval "$OUT/distill/student" --data "$DATA" --split test --teacher "$TEACHER" \
    --baseline "$OUT/baseline" --min-top1 "$MIN_TOP1" --out "$OUT/test" --force
  first_export="${EXPORT%%,*}"
  case "$first_export" in
    onnx) exported="$OUT/distill/export/model.onnx" ;;
    int8) exported="$OUT/distill/export/model.int8.onnx" ;;
    fp16|bf16) exported="$OUT/distill/export/$first_export" ;;
    *) exported="" ;;
  esac
  if [[ -n "$exported" ]]; then
    "${KDCLI[@]}" eval "$exported" --data "$DATA" --split test --teacher "$TEACHER" --min-top1 "$MIN_TOP1" \
      --out "$OUT/test-export" --force
  fi
  echo "done: $OUT/distill/student, held-out report $OUT/test/report.md"
else
  echo "done: $OUT/distill/student, report $OUT/distill/report.md (no $DATA/test/: no held-out evaluation)"
fi
