#!/usr/bin/env bash
# Issue 23's diagnostic: why do prompt-only students trail the image-data ones? The same teacher images, two pipelines.
#   bash scripts/prompt_gap.sh      # about 70 minutes on an idle 2-core machine
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
  --cache "$OUT/.cache" --w 6.5 --out runs/teacher_images --threads "$PAR"  # the CFG 7.5 data of --prompts --prompts-w 6.5
SPECS=(
  "ti-splam --method splam --data runs/teacher_images"
  "ti-lcm --method lcm --data runs/teacher_images"
)
train_runs "$OUT" "${SPECS[@]}"
"$PY" -m splam_studio.tools.bench --n 500 --curves $(run_dirs "$OUT" "${SPECS[@]}") \
  --curves-out benchmarks/prompt_gap.json --reference-cache runs/reference.safetensors
# Then the remedy that the diagnostic points to: teacher data at a lower guidance (--prompts-w), so that z_0 and so
# z_t = alpha z_0 + sigma eps lie where the teacher saw data; the distillation itself stays at w 6.5 (CFG 7.5).
# - pw0-*: teacher data at CFG 1 (w 0, the teacher's own data distribution), seeds 0-2 (one store, --prompts-seed 0,
#   as the CFG 7.5 prompt-only students of one_step.sh)
"$PY" scripts/teacher_images.py --prompts runs/shapes_prompts.txt --cache "$OUT/.cache" --w 0 --threads "$PAR"
P="--prompts runs/shapes_prompts.txt --prompts-seed 0"
SPECS2=(
  "pw0-splam --method splam $P --prompts-w 0"
  "pw0-lcm --method lcm $P --prompts-w 0"
  "pw0-splam-s1 --method splam $P --prompts-w 0 --seed 1"
  "pw0-lcm-s1 --method lcm $P --prompts-w 0 --seed 1"
  "pw0-splam-s2 --method splam $P --prompts-w 0 --seed 2"
  "pw0-lcm-s2 --method lcm $P --prompts-w 0 --seed 2"
)
train_runs "$OUT" "${SPECS2[@]}"
"$PY" -m splam_studio.tools.bench --n 500 --curves $(run_dirs "$OUT" "${SPECS[@]}" "${SPECS2[@]}") --resume-curves \
  --curves-out benchmarks/prompt_gap.json --reference-cache runs/reference.safetensors
