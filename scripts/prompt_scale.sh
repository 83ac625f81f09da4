#!/usr/bin/env bash
# Issue 23's remaining gap (prompt-only students trail the image-data ones on 4-step FID): is it the data's size? The
# image students draw 19,200 samples from 20,000 renders; the prompt-only ones repeat 2,048 teacher images ~9 times.
#   bash scripts/prompt_scale.sh    # about 45 minutes on an idle 2-core machine
# - x4-splam / x4-lcm (seeds 0-2): the same 2,048 prompts, 4 teacher images each (--images-per-prompt 4, 8,192
#   images at CFG 1, one store, --prompts-seed 0), the shapes preset otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
OUT=runs/prompt_gap
"$PY" -m splam_studio.tools.world prompts --n 2048 --seed 12345 --out runs/shapes_prompts.txt
"$PY" scripts/teacher_images.py --prompts runs/shapes_prompts.txt --cache "$OUT/.cache" --w 0 --images-per-prompt 4 \
  --threads "$PAR"
P="--prompts runs/shapes_prompts.txt --prompts-seed 0 --images-per-prompt 4"
SPECS=(
  "x4-splam --method splam $P"
  "x4-lcm --method lcm $P"
  "x4-splam-s1 --method splam $P --seed 1"
  "x4-lcm-s1 --method lcm $P --seed 1"
  "x4-splam-s2 --method splam $P --seed 2"
  "x4-lcm-s2 --method lcm $P --seed 2"
)
train_runs "$OUT" "${SPECS[@]}"
"$PY" -m splam_studio.tools.bench --n 500 --curves $(run_dirs "$OUT" "${SPECS[@]}") --resume-curves \
  --curves-out benchmarks/prompt_gap.json --reference-cache runs/reference.safetensors
"$PY" -m splam_studio.tools.report
