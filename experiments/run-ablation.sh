#!/usr/bin/env bash
# The evidence behind the default recipe (issue 12): `kdcli ablate` on the built-in synthetic set, a resnet10t
# teacher trained on all 5000 training images, a test_resnet student, 3 seeds, one CPU thread per run.
#   limited: the student sees 200 training images (about 20 per class), 24 epochs per cell
#   full:    the student sees all 5000, 12 epochs per cell
# Usage: experiments/run-ablation.sh OUT   (OUT/teacher is trained first unless it exists; rerunning resumes)
set -euo pipefail
OUT=${1:?usage: run-ablation.sh OUT}
RECIPE=${RECIPE:-smskd}
export OMP_NUM_THREADS=1
[ -f "$OUT/teacher/model.safetensors" ] || kdcli train resnet10t --data synthetic --epochs 15 --out "$OUT/teacher"
kdcli ablate "$OUT/teacher" test_resnet --data synthetic:train=200,val=1000 --epochs 24 --seeds 3 \
      --recipe "$RECIPE" --out "$OUT/limited-$RECIPE" ${CELLS:+--cells "$CELLS"} &
kdcli ablate "$OUT/teacher" test_resnet --data synthetic --epochs 12 --seeds 3 \
      --recipe "$RECIPE" --out "$OUT/full-$RECIPE" ${CELLS:+--cells "$CELLS"} &
wait
