#!/usr/bin/env bash
# The recipe sweep behind BENCHMARKS.md's "recipe sweep" table (issue 14), on 2 CPU cores.
#   bash scripts/sweep.sh [OUT]        # runs into OUT (default runs/sweep), then evaluates every run's curves
# Each run is the `shapes` preset with one or two changes, 1200 iterations of batch 32, a snapshot of theta^- every
# 200; the curves (FID and teacher distance at 1 / 2 / 4 steps along training, 500 held-out captions) go to
# benchmarks/sweep.json and benchmarks/sweep.png (the seed table: scripts/train_students.sh). On 2 cores the whole sweep takes a few hours: run what you need.
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
  "s1-lcm-1e5           --method lcm   --lr 1e-5 --seed 1"
  "a-lcmw-1e5           --method lcm   --lr 1e-5 --w-min 3 --w-max 10"
  "c-lcm-cos-1e5        --method lcm   --lr 1e-5 --lr-schedule cosine"
  "a-splam-1e5          --method splam --lr 1e-5"
  "b-splam-smooth-1e5   --method splam --lr 1e-5 --gamma-scale 0.005"
  "c-splam-cos-1e5      --method splam --lr 1e-5 --gamma-scale 0.005 --lr-schedule cosine"
  "a-lcm-600            --method lcm   --lr 1e-5 --max-steps 600"
  "c-splam-warm600      --method splam --lr 1e-5 --gamma-scale 0.005 --max-steps 600 --init-from $OUT/a-lcm-600"
)
for spec in "${RUNS[@]}"; do
  read -r name flags <<<"$spec"
  [ -d "$OUT/$name/unet" ] && continue  # finished already
  [ "$name" = c-splam-warm600 ] && wait  # its warm start must be finished
  "$PY" train_cli.py $TRAIN --run-name "$name" --overwrite $flags >"$OUT/$name.log" 2>&1 &
  while [ "$(jobs -rp | wc -l)" -ge "$PAR" ]; do sleep 5; done
done
wait
"$PY" -m splam_studio.tools.bench --n 500 --curves $(for spec in "${RUNS[@]}"; do n=${spec%% *}; [ "$n" != a-lcm-600 ] && echo "$OUT/$n"; done) \
  --curves-out benchmarks/sweep.json --curves-plot benchmarks/sweep.png --reference-cache "$OUT/reference.safetensors"
"$PY" -m splam_studio.tools.report
