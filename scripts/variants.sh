#!/usr/bin/env bash
# The SL-ODE variants past the paper (issue 14): the `shapes` preset (600 iterations, lr 1e-5, batch 32) with one or
# two changes, seed 0, snapshots every 200; on 2 CPU cores, two runs at a time (about 10 minutes a pair).
#   bash scripts/variants.sh [OUT]     # runs into OUT (default runs/variants), then benchmarks/variants.json
# The 3-seed groups of the winners are in scripts/train_students.sh. On a GPU: TRAIN="--device cuda".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
OUT=${1:-runs/variants}
RUNS=(
  "r-lcm-m2                --method lcm   --m 2"
  "r-splam-m2              --method splam --m 2 --gamma-one-prob 0.5"
  "r-splam-p08             --method splam --gamma-one-prob 0.8"
  "r-splam-p09             --method splam --gamma-one-prob 0.9"
  "r-splam-matched         --method splam --gamma-time matched --gamma-one-prob 0.5"
  "r-splam-matched-p0      --method splam --gamma-time matched --gamma-one-prob 0"
  "r-splam-matched-p08     --method splam --gamma-time matched --gamma-one-prob 0.8"
  "r-splam-matched-p09     --method splam --gamma-time matched --gamma-one-prob 0.9"
  "r-splam-matched-smooth  --method splam --gamma-time matched --gamma-scale 0.005 --gamma-one-prob 0.5"
  "r-splam-p08-cos1200     --method splam --gamma-one-prob 0.8 --max-steps 1200 --lr-schedule cosine"
)
train_runs "$OUT" "${RUNS[@]}"
"$PY" -m splam_studio.tools.bench --n 500 --curves weights/shapes-lcm $(run_dirs "$OUT" "${RUNS[@]}") \
  --curves-out benchmarks/variants.json --curves-plot benchmarks/variants.png --reference-cache "$OUT/reference.safetensors" ${BENCH:-}
"$PY" -m splam_studio.tools.report
