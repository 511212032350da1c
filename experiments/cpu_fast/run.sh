#!/usr/bin/env bash
# The cpu_fast record: 3 seeds, each its own race process from a COLD start (an empty jaxcifar cache, so
# the compile and the JPEG decoding are paid; the OS page cache dropped when allowed), on the full
# 50,000 training and 10,000 test images. Usage:
#   bash experiments/cpu_fast/run.sh DATA_DIR [OUT_DIR] [CONFIG]
# SEEDS (default "0 1 2") and TARGET (default 0.85) choose the seeds and the race's target; the airbench94 record:
#   SEEDS=0 TARGET=0.90 bash experiments/cpu_fast/run.sh DATA_DIR runs/airbench94 experiments/airbench94/config.json
set -euo pipefail
data_dir="$1"
out="${2:-runs/cpu_fast}"
config="${3:-experiments/cpu_fast/config.json}"
python="${PYTHON:-python}"
for seed in ${SEEDS:-0 1 2}; do
  cache="$(mktemp -d)"
  sync && { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null || true
  echo "seed $seed: load average $(cut -d' ' -f1-3 /proc/loadavg)"
  JAXCIFAR_CACHE_DIR="$cache" "$python" -m jaxcifar.race --config "$config" --data-dir "$data_dir" \
    --target "${TARGET:-0.85}" --runs 1 --seed "$seed" --out-dir "$out/seed-$seed"
  rm -rf "$cache"
done
"$python" "$(dirname "$0")/summarize.py" "$out"/seed-*/race.json
