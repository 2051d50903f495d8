#!/usr/bin/env bash
# The evidence behind the default recipe (issue 12): `kdcli ablate` runs, one CPU thread per run.
#   synthetic teacher: resnet10t trained on all 5000 images of the built-in synthetic set (15 epochs)
#   limited:   the test_resnet student sees 200 training images (about 20 per class), 24 epochs per cell, 3 seeds:
#              every cell of smskd, then the candidates joint-anchored (sequential) and joint-w1
#   full:      the student sees all 5000, 12 epochs per cell, 3 seeds: alone, kd, joint, seq-tcp, and the
#              candidates joint-w1 and joint-warm
#   shapes:    a CIFAR-shaped image folder (make_shapes.py: 4000 train / 1000 val PNG files, 32x32, 10 classes),
#              a resnet18d teacher trained on it (15 epochs), the same student, 12 epochs per cell, 3 seeds: alone,
#              kd, joint, joint-w1; never used to choose between candidates, only to check the choice
#   shapes10t: the same set with a resnet10t teacher (weaker than the student alone): alone, kd, joint
#   shapes-limited: the student sees 25 images per class of it, 24 epochs, 3 seeds: alone, kd, joint, joint-w1,
#              multi-teacher (the resnet18d and a resnet10t teacher), and resnet10t students with and without
#              --init-from-teacher
# Usage: experiments/run-ablation.sh OUT   (rerunning it reuses finished runs and resumes interrupted ones)
set -euo pipefail
OUT=$(mkdir -p "${1:?usage: run-ablation.sh OUT}" && cd "$1" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1
cd "$OUT"

[ -f teacher/model.safetensors ] || kdcli train resnet10t --data synthetic --epochs 15 --out teacher
LIMITED=(--data synthetic:train=200,val=1000 --epochs 24 --seeds 3)
kdcli ablate teacher test_resnet "${LIMITED[@]}" --out limited-smskd
kdcli ablate teacher test_resnet "${LIMITED[@]}" --recipe "$HERE/joint-anchored.yaml" --cells seq-tcp \
      --out limited-joint-anchored
kdcli ablate teacher test_resnet "${LIMITED[@]}" --recipe "$HERE/joint-w1.yaml" --cells joint --out limited-joint-w1
FULL=(--data synthetic --epochs 12 --seeds 3)
kdcli ablate teacher test_resnet "${FULL[@]}" --cells alone,kd,joint,seq-tcp --out full-smskd
for candidate in joint-w1 joint-warm; do
    kdcli ablate teacher test_resnet "${FULL[@]}" --recipe "$HERE/$candidate.yaml" --cells joint --out "full-$candidate"
done

[ -d shapes-data ] || python "$HERE/make_shapes.py" shapes-data --train 4000 --val 1000
if [ ! -d shapes-limited ]; then  # the first 25 training images of each class, the same validation images
    mkdir -p shapes-limited/train && ln -s "$OUT/shapes-data/val" shapes-limited/val
    for class in shapes-data/train/*/; do
        name=$(basename "$class") && mkdir -p "shapes-limited/train/$name"
        ls "$class" | head -25 | while read -r file; do ln -s "$OUT/$class$file" "shapes-limited/train/$name/$file"; done
    done
fi
[ -f shapes-teacher18d/model.safetensors ] || kdcli train resnet18d --data shapes-data --epochs 15 --out shapes-teacher18d
[ -f shapes-teacher/model.safetensors ] || kdcli train resnet10t --data shapes-data --epochs 15 --out shapes-teacher
T="$OUT/shapes-teacher18d"
kdcli ablate "$T" test_resnet --data shapes-data --epochs 12 --seeds 3 --cells alone,kd,joint --out shapes18d-smskd
kdcli ablate "$T" test_resnet --data shapes-data --epochs 12 --seeds 3 --recipe "$HERE/joint-w1.yaml" --cells joint \
      --out shapes18d-joint-w1
SHAPES_LIMITED=(--data shapes-limited --epochs 24 --seeds 3)
kdcli ablate "$T" test_resnet --teacher "$OUT/shapes-teacher" "${SHAPES_LIMITED[@]}" \
      --cells alone,kd,joint,multi-teacher --out shapes18d-limited
kdcli ablate "$T" test_resnet "${SHAPES_LIMITED[@]}" --recipe "$HERE/joint-w1.yaml" --cells joint \
      --out shapes18d-limited-joint-w1
kdcli ablate "$T" resnet10t "${SHAPES_LIMITED[@]}" --cells alone,kd --init-from-teacher --out shapes18d-limited-init
kdcli ablate "$T" resnet10t "${SHAPES_LIMITED[@]}" --cells alone,kd --out shapes18d-limited-noinit
# the same CIFAR-shaped set with a teacher weaker than the student alone (resnet10t, 81.7%)
kdcli ablate "$OUT/shapes-teacher" test_resnet --data shapes-data --epochs 12 --seeds 3 --cells alone,kd,joint \
      --out shapes10t-smskd
# caching's effect on accuracy (README, "What caching does to accuracy"): four stored views against fresh ones
kdcli ablate teacher test_resnet "${FULL[@]}" --recipe joint --set data.views=4 --cells joint --out full-joint-views4
kdcli ablate teacher test_resnet "${LIMITED[@]}" --recipe joint --set data.views=4 --cells joint \
      --out limited-joint-views4
kdcli ablate teacher test_resnet "${FULL[@]}" --recipe kd --set data.views=4 --cells kd --out full-kd-views4
kdcli ablate teacher test_resnet "${FULL[@]}" --recipe kd --cells kd --out full-kd-fresh
