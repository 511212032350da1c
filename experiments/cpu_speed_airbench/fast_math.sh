#!/usr/bin/env bash
# Does XLA:CPU's fast-math mode speed up the airbench train step? The bench at width 64, batch 512, alternating
# three XLA_FLAGS variants for ROUNDS rounds (default 3), each in a fresh process with an empty compile cache:
#   base      XLA's defaults
#   fastmath  --xla_cpu_enable_fast_math=true (reassociation; NaNs, infinities, division and functions honoured)
#   fastfunc  fastmath and --xla_cpu_fast_math_honor_functions=false --xla_cpu_fast_math_honor_division=false
#             (approximate erf/exp/division too; NaNs and infinities still honoured, so the nan check still works)
# Prints one line per bench: round, variant, jax train and eval images/s, ms/step and min ms.
#   bash experiments/cpu_speed_airbench/fast_math.sh [ROUNDS] > experiments/cpu_speed_airbench/fast_math.txt
set -euo pipefail
python="${PYTHON:-python}"
declare -A flags=(
    [base]=""
    [fastmath]="--xla_cpu_enable_fast_math=true"
    [fastfunc]="--xla_cpu_enable_fast_math=true --xla_cpu_fast_math_honor_functions=false --xla_cpu_fast_math_honor_division=false"
)
echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg), $(git rev-parse --short HEAD)"
for round in $(seq 1 "${1:-3}"); do
    for variant in base fastmath fastfunc; do
        cache="$(mktemp -d)"
        out="$(XLA_FLAGS="${flags[$variant]}" JAXCIFAR_CACHE_DIR="$cache" "$python" -m jaxcifar.bench --model airbench \
            --width 64 --batch-size 512 --steps 5 --warmup 1 2>&1)"
        rm -rf "$cache"
        train="$(grep -E '^jax train' <<<"$out" | awk '{print $3, $4, $5}')"
        eval="$(grep -E '^jax eval' <<<"$out" | awk '{print $3, $4, $5}')"
        echo "round $round $variant | train images/s ms min_ms: $train | eval: $eval | load $(cut -d' ' -f1 /proc/loadavg)"
    done
done
