#!/usr/bin/env bash
# the loop body of experiments/cpu_fast/run.sh with the airbench94 preset, seed 0, target 90 %
set -euo pipefail
cd /work/main
cache="$(mktemp -d)"
sync && { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null || true
echo "seed 0: load average $(cut -d' ' -f1-3 /proc/loadavg) $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD)"
JAXCIFAR_CACHE_DIR="$cache" .venv/bin/python -m jaxcifar.race --config experiments/airbench94/config.json \
  --data-dir /tmp/data/cifar10-jpeg --target 0.90 --runs 1 --seed 0 --out-dir /work/runs/ab94_jax/seed-0
rm -rf "$cache"
date -u +%FT%TZ
