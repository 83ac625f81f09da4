#!/usr/bin/env bash
# Issue 25's split recipe: the regression's teacher pairs (z_T, z_0) at the distillation's w in a store of their own
# (--regression-prompts, or --prompts at another --prompts-w), so that the consistency loss keeps the data it is best
# on (the rendered images, or teacher data at CFG 1) while the 1-step student regresses onto the guided ODE. Beside
# the best 1-step recipe so far (p-splam-reg-k: teacher data at CFG 7.5 serving both), 3 seeds each, 600 steps:
#   bash scripts/one_step_pairs.sh    # about 70 minutes on an idle 2-core machine (two runs at a time)
#   STAGE=embed bash scripts/one_step_pairs.sh   # then r-img-p09 / r-img-lcm into weights/ as the `shapes-1step` set
# - r-img: image data (the shapes renders, as the embedded students) + pairs from 2,048 training-split captions
# - r-pw0: teacher data at CFG 1 (--prompts-w 0) + pairs from the same prompts at CFG 7.5
# Both add regression 0.25 and the k schedule (k 100 from t >= 500). The pair store is the one of one_step.sh (seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
OUT=runs/one_step
if [ "${STAGE:-all}" = embed ]; then  # the seed-0 pair of the split recipe as the `shapes-1step` model set
  embed "$OUT/r-img-p09" shapes-1step-splam && embed "$OUT/r-img-lcm" shapes-1step-lcm && exit 0
fi
"$PY" -m splam_studio.tools.world prompts --n 2048 --seed 12345 --out runs/shapes_prompts.txt
K="--method splam --regression 0.25 --k-high 100 --t-high 500 --prompts-seed 0"
I="$K --regression-prompts runs/shapes_prompts.txt"
P="$K --prompts runs/shapes_prompts.txt --prompts-w 0"
SPECS=(
  "r-img $I"
  "r-pw0 $P"
  "r-img-s1 $I --seed 1"
  "r-img-s2 $I --seed 2"
  "r-pw0-s1 $P --seed 1"
  "r-pw0-s2 $P --seed 2"
)
train_runs "$OUT" "${SPECS[@]}"
"$PY" -m splam_studio.tools.bench --n 500 --curves $(run_dirs "$OUT" "${SPECS[@]}") --resume-curves \
  --curves-out benchmarks/one_step.json --reference-cache runs/reference.safetensors
# Then what the split recipe costs at 2 and 4 steps (teacher MSE), one knob at a time (seed 0 unless named):
# - r-img-w01: regression 0.1 instead of 0.25; r-img-nok: without the k schedule; r-img-lcm: LCM on the split recipe;
#   r-img-p09: p(gamma = 1) 0.9 (seeds 0-2: the best 2- and 4-step teacher MSE of the split recipe)
SPECS2=(
  "r-img-w01 --method splam --regression 0.1 --k-high 100 --t-high 500 --prompts-seed 0 --regression-prompts runs/shapes_prompts.txt"
  "r-img-nok --method splam --regression 0.25 --prompts-seed 0 --regression-prompts runs/shapes_prompts.txt"
  "r-img-lcm ${I/--method splam/--method lcm}"
  "r-img-p09 $I --gamma-one-prob 0.9"
  "r-img-p09-s1 $I --gamma-one-prob 0.9 --seed 1"
  "r-img-p09-s2 $I --gamma-one-prob 0.9 --seed 2"
)
train_runs "$OUT" "${SPECS2[@]}"
"$PY" -m splam_studio.tools.bench --n 500 --curves $(run_dirs "$OUT" "${SPECS2[@]}") --resume-curves \
  --curves-out benchmarks/one_step.json --reference-cache runs/reference.safetensors
"$PY" -m splam_studio.tools.report
