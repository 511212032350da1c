#!/usr/bin/env bash
# Run 9: whole short runs of the airbench94_muon preset with and without the late train step, alternating
# late / full / late / full: 10,000 training images (5 steps of 2,000 an epoch), 6 epochs; "late" trains the
# whitening bias for 2 epochs and then steps with RunSetup.late_train_step (epochs 3-6), "full" for all 6 (the
# late step never runs). Prints each run's train seconds and test accuracy per epoch (output: late_step_runs.txt).
#   PYTHON=.venv/bin/python bash experiments/cpu_speed_airbench/late_step_runs.sh DATA_DIR [OUT_DIR]
set -euo pipefail
data_dir="$1"
out="${2:-runs/late_step_runs}"
python="${PYTHON:-python}"
for variant in late full late full; do
  if [[ $variant == late ]]; then bias_epochs=2; else bias_epochs=6; fi
  rm -rf "$out/$variant"
  "$python" -m jaxcifar.train --config experiments/airbench94_muon/config.json --data-dir "$data_dir" \
    --train-subset 10000 --test-subset 1000 --epochs 6 --whiten-bias-epochs "$bias_epochs" \
    --workdir "$out/$variant" >"$out-$variant.log" 2>&1
  "$python" -c "
import json, sys
history = json.load(open(sys.argv[1]))
print(sys.argv[2], 'whiten_bias_epochs', sys.argv[3], 'train seconds', [round(r['train_seconds'], 1) for r in history],
      'test acc %', [round(100 * r['test_acc'], 2) for r in history])" "$out/$variant/history.json" "$variant" "$bias_epochs"
done
