# Shared by scripts/sweep.sh and scripts/variants.sh (source it): train a list of runs of the `shapes` preset, PAR at
# a time with one thread each, skipping finished ones. Each spec is "NAME FLAGS..."; extra train_cli flags in TRAIN.
PY=${PYTHON:-.venv/bin/python}
PAR=${PAR:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

train_runs() {  # train_runs OUT SPEC...
  local out=$1 spec name flags; shift
  mkdir -p "$out"
  for spec in "$@"; do
    read -r name flags <<<"$spec"
    { [ -d "$out/$name/unet" ] || [ -d "$out/$name/lora" ]; } && continue  # finished already
    "$PY" train_cli.py --preset shapes --output-dir "$out" --snapshot-every 200 --validate-every 0 \
      --checkpoint-every 100000 ${TRAIN:-} --run-name "$name" --overwrite $flags >"$out/$name.log" 2>&1 &
    while [ "$(jobs -rp | wc -l)" -ge "$PAR" ]; do sleep 5; done
  done
  wait
}

run_dirs() {  # run_dirs OUT SPEC...: the run folders of the specs
  local out=$1 spec; shift
  for spec in "$@"; do echo "$out/${spec%% *}"; done
}

embed() {  # embed RUN_DIR NAME: a finished run's exported student, config, stats and last validation grid -> weights/NAME
  local src=$1 dst=weights/$2
  rm -rf "$dst.tmp" && mkdir -p "$dst.tmp"
  cp -r "$src/$( [ -d "$src/lora" ] && echo lora || echo unet )" "$src/stats.jsonl" "$src/validation" "$dst.tmp/"
  "$PY" - "$src/training_config.json" "$dst.tmp/training_config.json" "$2" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.update(run_name=sys.argv[3], output_dir="weights")
json.dump(c, open(sys.argv[2], "w"), indent=2)
PY
  rm -rf "$dst" && mv "$dst.tmp" "$dst"
}
