#!/usr/bin/env bash
# The evidence behind the default recipe (issue 12), exactly the commands that made experiments/ablation/:
# `kdcli ablate` on the built-in synthetic set, a resnet10t teacher trained on all 5000 training images, a
# test_resnet student, one CPU thread per run.
#   limited:  the student sees 200 training images (about 20 per class), 24 epochs per cell, every cell, 3 seeds
#   candidate: experiments/joint-anchored.yaml's sequential cell on the same data, 3 seeds
#   full:     the student sees all 5000, 12 epochs per cell, cells alone, kd, joint, seq-tcp (time allowed no more)
# Usage: experiments/run-ablation.sh OUT   (rerunning it reuses finished runs and resumes interrupted ones)
set -euo pipefail
OUT=${1:?usage: run-ablation.sh OUT}
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1
[ -f "$OUT/teacher/model.safetensors" ] || kdcli train resnet10t --data synthetic --epochs 15 --out "$OUT/teacher"
LIMITED=(--data synthetic:train=200,val=1000 --epochs 24 --seeds 3)
kdcli ablate "$OUT/teacher" test_resnet "${LIMITED[@]}" --out "$OUT/limited-smskd"
kdcli ablate "$OUT/teacher" test_resnet "${LIMITED[@]}" --recipe "$HERE/joint-anchored.yaml" --cells seq-tcp \
      --out "$OUT/limited-joint-anchored"
kdcli ablate "$OUT/teacher" test_resnet --data synthetic --epochs 12 --seeds "${FULL_SEEDS:-2}" \
      --cells alone,kd,joint,seq-tcp --out "$OUT/full-smskd"
