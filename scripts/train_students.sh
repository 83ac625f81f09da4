#!/usr/bin/env bash
# The embedded Shapes students and the ablation runs, on 2 CPU cores (two runs at a time, one thread each).
#   bash scripts/train_students.sh            # about 14 minutes (13.5 measured)
# Every run uses the `shapes` preset of train_cli.py; the ablations change one thing each at a 200-step budget
# (the main runs' snapshots at step 200 are their baseline and gamma = 1 arms).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p weights/logs
run() { "$PY" train_cli.py --preset shapes "$@" > "weights/logs/$(echo "$*" | sed 's/.*--run-name \([^ ]*\).*/\1/').log" 2>&1; }
run --method splam --run-name shapes-splam & run --method lcm --run-name shapes-lcm & wait
run --method splam --run-name ablate-uniform --max-steps 200 --gamma-one-prob 0 --snapshot-every 0 --validate-every 0 &
run --method splam --run-name ablate-k40m2 --max-steps 200 --m 2 --snapshot-every 0 --validate-every 0 & wait
run --method splam --run-name ablate-freshinit --max-steps 200 --cond-proj-init fresh --snapshot-every 0 --validate-every 0
