#!/usr/bin/env bash
# The evidence behind the default recipe (issue 12), exactly the commands that made experiments/ablation/:
# `kdcli ablate` on the built-in synthetic set, a resnet10t teacher trained on all 5000 training images, a
# test_resnet student, one CPU thread per run.
#   limited:  the student sees 200 training images (about 20 per class), 24 epochs per cell, every cell, 3 seeds
#   candidate: experiments/joint-anchored.yaml's sequential cell on the same data, 3 seeds
#   full:     the student sees all 5000, 12 epochs per cell, cells alone, kd, joint (3 seeds), seq-tcp (seed 0)
#   shapes:   a CIFAR-shaped image folder (experiments/make_shapes.py: 2500 train / 1000 val PNG files, 32x32, 10
#             classes), a resnet10t teacher trained on it, cells alone, kd, joint, 12 epochs, 3 seeds
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
kdcli ablate "$OUT/teacher" test_resnet --data synthetic --epochs 12 --seeds 1 --cells seq-tcp --out "$OUT/full-smskd"
kdcli ablate "$OUT/teacher" test_resnet --data synthetic --epochs 12 --seeds 3 --cells alone,kd,joint \
      --out "$OUT/full-smskd"
[ -d "$OUT/shapes-data" ] || python "$HERE/make_shapes.py" "$OUT/shapes-data" --train 2500 --val 1000
[ -f "$OUT/shapes-teacher/model.safetensors" ] || \
    kdcli train resnet10t --data "$OUT/shapes-data" --epochs 20 --out "$OUT/shapes-teacher"
kdcli ablate "$OUT/shapes-teacher" test_resnet --data "$OUT/shapes-data" --epochs 12 --seeds 3 \
      --cells alone,kd,joint --out "$OUT/shapes-smskd"
