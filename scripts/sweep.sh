#!/usr/bin/env bash
# The recipe sweep behind BENCHMARKS.md's "recipe sweep" table (issue 14), on 2 CPU cores.
#   bash scripts/sweep.sh [OUT]        # runs into OUT (default runs/sweep), then evaluates every run's curves
# Each run is the `shapes` preset with one or two changes, 1200 iterations of batch 32, a snapshot of theta^- every
# 200; the curves (FID and teacher distance at 1 / 2 / 4 steps along training, 500 held-out captions) go to
# benchmarks/sweep.json and benchmarks/sweep.png. On 2 cores the whole sweep takes a few hours: run what you need.
# On a GPU add `--device cuda` to TRAIN and to the bench line: the same sweep then runs in minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/sweep}
PAR=${PAR:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
TRAIN="--preset shapes --output-dir $OUT --max-steps 1200 --snapshot-every 200 --validate-every 0 --checkpoint-every 100000"
RUNS=(
  "a-lcm-1e5            --method lcm   --lr 1e-5"
  "a-splam-1e5          --method splam --lr 1e-5"
  "b-splam-smooth-1e5   --method splam --lr 1e-5 --gamma-scale 0.005"
)
for spec in "${RUNS[@]}"; do
  read -r name flags <<<"$spec"
  [ -d "$OUT/$name/unet" ] && continue  # finished already
  "$PY" train_cli.py $TRAIN --run-name "$name" --overwrite $flags >"$OUT/$name.log" 2>&1 &
  while [ "$(jobs -rp | wc -l)" -ge "$PAR" ]; do sleep 5; done
done
wait
"$PY" -m splam_studio.tools.bench --n 500 --curves $(for spec in "${RUNS[@]}"; do echo "$OUT/${spec%% *}"; done) \
  --curves-out benchmarks/sweep.json --curves-plot benchmarks/sweep.png --reference-cache "$OUT/reference.safetensors"
"$PY" -m splam_studio.tools.report
