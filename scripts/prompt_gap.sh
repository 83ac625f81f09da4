#!/usr/bin/env bash
# Issue 23's diagnostic: why do prompt-only students trail the image-data ones? The same teacher images, two pipelines.
#   bash scripts/prompt_gap.sh      # about 25 minutes on an idle 2-core machine
# - ti-splam / ti-lcm: the 2,048 teacher images of `--prompts` (seed 0), decoded to PNG and trained on through the plain
#   image path (`--data DIR`: VAE posterior draws at every step, as rendered data), seed 0, the shapes preset.
# Beside p-splam / p-lcm (the same images as stored latents, benchmarks/one_step.json) and the embedded students (the
# renders, benchmarks/seeds.json): equal to p-* means the content is the cause; equal to the renders, the pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
OUT=runs/prompt_gap
"$PY" -m splam_studio.tools.world prompts --n 2048 --seed 12345 --out runs/shapes_prompts.txt
[ -f runs/teacher_images/02047.txt ] || "$PY" scripts/teacher_images.py --prompts runs/shapes_prompts.txt \
  --cache "$OUT/.cache" --out runs/teacher_images --threads "$PAR"
SPECS=(
  "ti-splam --method splam --data runs/teacher_images"
  "ti-lcm --method lcm --data runs/teacher_images"
)
train_runs "$OUT" "${SPECS[@]}"
"$PY" -m splam_studio.tools.bench --n 500 --curves $(run_dirs "$OUT" "${SPECS[@]}") \
  --curves-out benchmarks/prompt_gap.json --reference-cache runs/reference.safetensors
