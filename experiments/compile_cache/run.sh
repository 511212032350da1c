#!/usr/bin/env bash
# Each configuration trains twice with one fresh, empty persistent compilation cache: the first run
# compiles and fills it, the second (identical) run loads from it. Prints the compile line and the
# timing line of each run, and the load average. Synthetic data: compiling depends on the
# configuration's shapes, not on the images. Usage: bash experiments/compile_cache/run.sh
set -euo pipefail
cache="$(mktemp -d)"
work="$(mktemp -d)"
unset JAX_COMPILATION_CACHE_DIR
export JAXCIFAR_CACHE_DIR="$cache"
common=(--data-source synthetic --test-subset 1000 --epochs 1 --log-every 1000)
declare -A configs=(
  [cpu_quick]="--config experiments/cpu_quick/config.json --train-subset 1280"
  [full_width]="--config experiments/resnet18_onecycle_20ep/config.json --train-subset 2048"
)
for name in cpu_quick full_width; do
  for attempt in first re-run; do
    echo "== $name, $attempt run (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    # shellcheck disable=SC2086
    python -m jaxcifar.train ${configs[$name]} "${common[@]}" --workdir "$work/$name-$attempt" 2>&1 \
      | grep -E "^(compile|time):|error" || true
  done
done
echo "cache: $(du -sh "$cache/xla" | cut -f1) in $(find "$cache/xla" -type f | wc -l) files"
rm -rf "$cache" "$work"
