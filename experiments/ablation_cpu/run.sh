#!/usr/bin/env bash
# The CPU ablation of issue 7: 4 training variants x 3 seeds (+ TTA evaluated on the baseline runs).
# Usage: bash experiments/ablation_cpu/run.sh DATA_DIR [RUNS_DIR]   (DATA_DIR = the unpacked JPEG tree)
set -euo pipefail
data_dir="$1"
runs="${2:-runs/ablation_cpu}"
here="$(dirname "$0")"
declare -A variants=(
  [baseline]=""
  [label_smoothing]="--label-smoothing 0.1"
  [ema]="--ema-decay 0.99"
  [cutmix]="--cutmix-alpha 1.0"
)
for seed in 0 1 2; do
  for name in baseline label_smoothing ema cutmix; do
    workdir="$runs/$name/seed$seed"
    mkdir -p "$(dirname "$workdir")"
    [ -f "$workdir/history.json" ] && [ "$(python -c "import json;print(len(json.load(open('$workdir/history.json'))))")" = 4 ] && continue
    # shellcheck disable=SC2086
    /usr/bin/time -f "%e" -o "$workdir.time" python -m jaxcifar.train --config "$here/config.json" \
      --data-dir "$data_dir" --seed "$seed" --workdir "$workdir" ${variants[$name]} --resume
  done
  python -m jaxcifar.report --workdir "$runs/baseline/seed$seed" --tta flip --out-dir "$runs/baseline_tta/seed$seed"
done
python "$here/summarize.py" "$runs"
