#!/usr/bin/env bash
# The recipe sweep behind BENCHMARKS.md's "recipe sweep" table (issue 14), on 2 CPU cores.
#   bash scripts/sweep.sh [OUT]        # runs into OUT (default runs/sweep), then evaluates every run's curves
# Each run is the `shapes` preset with one or two changes, 1200 iterations of batch 32, a snapshot of theta^- every
# 200; the curves (FID and teacher distance at 1 / 2 / 4 steps along training, 500 held-out captions) go to
# benchmarks/sweep.json and benchmarks/sweep.png (the seed table: scripts/train_students.sh). The sweep ran before
# the preset's p(gamma = 1) became 0.8, so its SPLAM runs name 0.5. On 2 cores the whole sweep takes a few hours.
# On a GPU: TRAIN="--device cuda" BENCH="--device cuda" bash scripts/sweep.sh: the same sweep then runs in minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
OUT=${1:-runs/sweep}
TRAIN="--max-steps 1200 ${TRAIN:-}"
RUNS=(
  "a-lcm-1e5            --method lcm   --lr 1e-5"
  "s1-lcm-1e5           --method lcm   --lr 1e-5 --seed 1"
  "a-lcmw-1e5           --method lcm   --lr 1e-5 --w-min 3 --w-max 10"
  "c-lcm-cos-1e5        --method lcm   --lr 1e-5 --lr-schedule cosine"
  "a-splam-1e5          --method splam --lr 1e-5 --gamma-one-prob 0.5"
  "b-splam-smooth-1e5   --method splam --lr 1e-5 --gamma-one-prob 0.5 --gamma-scale 0.005"
  "c-splam-cos-1e5      --method splam --lr 1e-5 --gamma-one-prob 0.5 --gamma-scale 0.005 --lr-schedule cosine"
)
train_runs "$OUT" "${RUNS[@]}" "a-lcm-600 --method lcm --lr 1e-5 --max-steps 600"
# the warm start needs its LCM run finished first
train_runs "$OUT" "c-splam-warm600 --method splam --lr 1e-5 --gamma-one-prob 0.5 --gamma-scale 0.005 --max-steps 600 --init-from $OUT/a-lcm-600"
"$PY" -m splam_studio.tools.bench --n 500 --curves $(run_dirs "$OUT" "${RUNS[@]}" "c-splam-warm600") \
  --curves-out benchmarks/sweep.json --curves-plot benchmarks/sweep.png --reference-cache "$OUT/reference.safetensors" ${BENCH:-}
"$PY" -m splam_studio.tools.report
