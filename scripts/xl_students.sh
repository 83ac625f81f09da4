#!/usr/bin/env bash
# The Shapes-XL students (issue 22): SPLAM and LCM distilled from weights/shapes-xl-teacher by the SDXL path of the
# trainer, as a full pair and a LoRA pair, on 2 CPU cores (two runs at a time, one thread each, about 8 minutes a pair).
#   bash scripts/xl_students.sh                 # all seeds, then the bench curves
#   STAGE=lora bash scripts/xl_students.sh      # only the LoRA pair (seed 0); STAGE=lora-seeds: seeds 1 and 2
#   STAGE=embed-lora bash scripts/xl_students.sh  # the seed-0 LoRA pair as the `shapes-xl-lora` set
#   STAGE=embed bash scripts/xl_students.sh     # copy the seed-0 full pair into weights/ as the `shapes-xl` set
# Every run is the `shapes` preset (600 steps, batch 32, p(gamma = 1) 0.8) with --teacher weights/shapes-xl-teacher;
# SPLAM and LCM differ only in --method. The full pair is lr 1e-5 (the SD pair's recipe); the LoRA pair is rank 16 at
# lr 5e-4 with the gamma projection at the same lr (--cond-proj-lr-scale 1). Seed 0 of each pair is what the
# `shapes-xl` model set embeds (STAGE=embed: weights/shapes-xl-{splam,lcm}); seeds 1 and 2 stay in runs/xl.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
OUT=${OUT:-runs/xl}
TRAIN="--teacher weights/shapes-xl-teacher --threads 1 ${TRAIN:-}"
LORA="--lora-rank 16 --lr 5e-4 --cond-proj-lr-scale 1"
if [ "${STAGE:-all}" = embed ]; then
  embed "$OUT/xl-splam" shapes-xl-splam && embed "$OUT/xl-lcm" shapes-xl-lcm && exit 0
fi
if [ "${STAGE:-all}" = embed-lora ]; then
  embed "$OUT/xl-splam-lora" shapes-xl-lora-splam && embed "$OUT/xl-lcm-lora" shapes-xl-lora-lcm && exit 0
fi
SPECS=()
case "${STAGE:-all}" in
  lora) SPECS+=("xl-splam-lora --method splam $LORA" "xl-lcm-lora --method lcm $LORA") ;;
  lora-seeds) for s in 1 2; do SPECS+=("xl-splam-lora-s$s --method splam --seed $s $LORA" "xl-lcm-lora-s$s --method lcm --seed $s $LORA"); done ;;
  full) SPECS+=("xl-splam --method splam" "xl-lcm --method lcm")
       for s in 1 2; do SPECS+=("xl-splam-s$s --method splam --seed $s" "xl-lcm-s$s --method lcm --seed $s"); done ;;
  all) SPECS+=("xl-splam-lora --method splam $LORA" "xl-lcm-lora --method lcm $LORA")
       SPECS+=("xl-splam --method splam" "xl-lcm --method lcm")
       for s in 1 2; do SPECS+=("xl-splam-s$s --method splam --seed $s" "xl-lcm-s$s --method lcm --seed $s"); done ;;
  *) echo "STAGE is lora, lora-seeds, full, all, embed or embed-lora" >&2; exit 2 ;;
esac
train_runs "$OUT" "${SPECS[@]}"
[ "${BENCH:-1}" = 1 ] || exit 0
# every finished run under $OUT (the earlier lr-1e-4 LoRA pair too, if kept there); points measured before are reused
mapfile -t dirs < <(for d in "$OUT"/xl-*/; do [ -d "$d/unet" ] || [ -d "$d/lora" ] && echo "${d%/}"; done)
"$PY" -m splam_studio.tools.bench --teacher shapes-xl-teacher --n 500 --curves "${dirs[@]}" --resume-curves \
  --curves-out benchmarks/xl_curves.json --reference-cache runs/reference.safetensors
"$PY" -m splam_studio.tools.report
