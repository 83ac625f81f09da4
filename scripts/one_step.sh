#!/usr/bin/env bash
# The 1-step ablations of issue 25 on the Shapes world: each one change against the embedded SPLAM recipe (the
# `shapes` preset, p(gamma = 1) 0.8, seed 0, 600 steps), then the curves at 1 / 2 / 4 steps -> benchmarks/one_step.json.
#   bash scripts/one_step.sh        # about 40 minutes on an idle 2-core machine (two runs at a time)
# - a-khigh100: the k schedule, sub-paths of k = 100 from t >= 500 (5 of them above t = 500 instead of 25)
# - b-ttop025:  timesteps weighted toward t = 999 (drawn with probability 0.25, else uniform on the grid)
# - p-splam:    teacher data from prompts only (2048 training-split captions, one teacher image each), no regression
# - p-splam-reg: the same plus DMD's regression of F(z_T, 999) onto the teacher's z_0 from the same z_T, weight 0.25
# - p-lcm:      LCM on the same teacher data (issue 23's prompt-only arm)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
OUT=runs/one_step
"$PY" -m splam_studio.tools.world prompts --n 2048 --seed 12345 --out runs/shapes_prompts.txt
P="--prompts runs/shapes_prompts.txt --prompts-seed 0"
SPECS=(
  "a-khigh100 --method splam --k-high 100 --t-high 500"
  "b-ttop025 --method splam --t-top-prob 0.25"
  "p-splam --method splam $P"
  "p-splam-reg --method splam --regression 0.25 $P"
  "p-lcm --method lcm $P"
)
train_runs "$OUT" "${SPECS[@]}"
"$PY" -m splam_studio.tools.bench --n 500 --curves $(run_dirs "$OUT" "${SPECS[@]}") \
  --curves-out benchmarks/one_step.json --reference-cache runs/reference.safetensors
"$PY" -m splam_studio.tools.report
