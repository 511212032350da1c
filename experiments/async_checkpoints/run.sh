#!/usr/bin/env bash
# The time the training loop waits for checkpoint writes, at full width (ResNet18 width 64, ~90 MB of
# state per checkpoint), with synchronous and with asynchronous (background) saves. Synthetic data,
# 2 epochs of 3 steps; one shared persistent compilation cache so that only the first run compiles.
# Prints each run's timing line and its checkpoint seconds per save. Usage: bash experiments/async_checkpoints/run.sh
set -euo pipefail
work="$(mktemp -d)"
export JAXCIFAR_CACHE_DIR="$work/cache"
unset JAX_COMPILATION_CACHE_DIR
args=(--config experiments/resnet18_onecycle_20ep/config.json --data-source synthetic --train-subset 1536
  --test-subset 500 --epochs 2 --log-every 1000)
for mode in --no-async-checkpoints --async-checkpoints; do
  echo "== $mode (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  python -m jaxcifar.train "${args[@]}" "$mode" --workdir "$work/$mode" 2>&1 | grep -E "^(time|epoch)" || true
  python - "$work/$mode" <<'PY'
import json, sys
from pathlib import Path
timing = json.loads((Path(sys.argv[1]) / "timing.json").read_text())
epochs = len(json.loads((Path(sys.argv[1]) / "history.json").read_text()))
print(f"checkpoint wait: {timing['checkpoint']:.2f} s for {epochs} saves = {timing['checkpoint'] / epochs:.2f} s per save")
PY
done
du -sh "$work/--async-checkpoints/checkpoints" | cut -f1 | sed 's/^/one run'"'"'s checkpoints folder: /'
rm -rf "$work"
