#!/usr/bin/env bash
# Issue 25's distribution-matching rows (--dmd, core/dmd.py) on the best 1-step recipe so far (teacher data from
# prompts + regression 0.25 + k 100 from t >= 500; benchmarks/one_step.json, p-splam-reg-k), seed 0, 600 steps:
#   bash scripts/one_step_dmd.sh     # about 45 minutes on an idle 2-core machine (two runs at a time)
# - d-dmd1 / d-dmd025: DMD weight 1 / 0.25 (DMD's own ratio is regression 0.25 to distribution matching 1), the fake
#   score at the default lr 1e-4; d-dmd025-lr3: weight 0.25 with the fake score at lr 1e-3 (DMD2 updates it 5 times per
#   student step to keep it on the student's images; here it takes one step at a 10x lr). The teacher data is the same
#   store as one_step.sh's and prompt_gap.sh's (seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
OUT=runs/one_step
"$PY" -m splam_studio.tools.world prompts --n 2048 --seed 12345 --out runs/shapes_prompts.txt
R="--method splam --prompts runs/shapes_prompts.txt --prompts-seed 0 --regression 0.25 --k-high 100 --t-high 500"
SPECS=(
  "d-dmd1 $R --dmd 1"
  "d-dmd025 $R --dmd 0.25"
  "d-dmd025-lr3 $R --dmd 0.25 --dmd-lr 1e-3"
)
train_runs "$OUT" "${SPECS[@]}"
"$PY" -m splam_studio.tools.bench --n 500 --curves $(run_dirs "$OUT" "${SPECS[@]}") --resume-curves \
  --curves-out benchmarks/one_step.json --reference-cache runs/reference.safetensors
"$PY" -m splam_studio.tools.report
