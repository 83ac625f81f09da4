#!/usr/bin/env bash
# The embedded Shapes students and their seed replicas, on 2 CPU cores (two runs at a time, one thread each).
#   bash scripts/train_students.sh            # about 25 minutes on an idle machine
# Every run is the `shapes` preset of train_cli.py (600 steps, lr 1e-5, batch 32, SPLAM at p(gamma = 1) 0.8); SPLAM
# and LCM differ only in --method. Seed 0 is the embedded pair (weights/shapes-{splam,lcm}, replacing the old ones:
# they go to weights/.trash/); seeds 1 and 2 go to runs/seeds/. VARIANTS=1 also trains the seed groups of the
# other SPLAM rows of the table (matched timestep at p(gamma = 1) 0.8 and 0.9; p 0.5, the earlier default; smooth
# gamma embedding).
# Then the seed table of BENCHMARKS.md is measured. (In the committed seeds.json the same runs carry the names of
# the sessions that trained them: r-splam-p08-s1/s2, r-splam-matched-p08(-s1/-s2), s1/s2-*-1e5; see its note.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p weights/logs runs/seeds
run() { local name=$1; shift; "$PY" train_cli.py --preset shapes --run-name "$name" "$@" > "runs/$name.log" 2>&1; }
run shapes-splam --method splam --overwrite & run shapes-lcm --method lcm --overwrite & wait
for s in 1 2; do
  run "seed$s-splam" --method splam --seed $s --output-dir runs/seeds --overwrite &
  run "seed$s-lcm" --method lcm --seed $s --output-dir runs/seeds --overwrite & wait
done
extra=()
if [ "${VARIANTS:-0}" = 1 ]; then
  for s in 0 1 2; do
    run "seed$s-splam-matched" --method splam --gamma-time matched --seed $s --output-dir runs/seeds --overwrite &
    run "seed$s-splam-matched-p09" --method splam --gamma-time matched --gamma-one-prob 0.9 --seed $s --output-dir runs/seeds --overwrite & wait
    run "seed$s-splam-p05" --method splam --gamma-one-prob 0.5 --seed $s --output-dir runs/seeds --overwrite &
    run "seed$s-splam-smooth" --method splam --gamma-one-prob 0.5 --gamma-scale 0.005 --seed $s --output-dir runs/seeds --overwrite & wait
    extra+=(runs/seeds/seed$s-splam-{matched,matched-p09,p05,smooth})
  done
fi
"$PY" -m splam_studio.tools.bench --n 500 --curves weights/shapes-lcm weights/shapes-splam runs/seeds/seed{1,2}-{lcm,splam} "${extra[@]}" \
  --curves-out benchmarks/seeds.json --reference-cache runs/reference.safetensors
"$PY" -m splam_studio.tools.report
