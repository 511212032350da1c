#!/usr/bin/env bash
# The GPU checks of issue 13, prepared for a session that is lent a GPU (the device tool's `run`): whole-run
# time breakdowns cold and warm (float32 with --report, bfloat16), float16 accuracy, the bench's PyTorch
# comparison on CUDA, and the notebook in full mode. Nothing here has run on a GPU yet; GPU_CHECK_SMOKE=1
# runs every step on this CPU with tiny settings (how the script itself was checked).
#
#   bash experiments/gpu_check/run.sh STEP...   # steps: runs float16 bench notebook preset fast (default: the first four)
#
# `fast` is issue 19's: the airbench94 and airbench94_muon presets in bfloat16 (3 seeds each) and resnet9_24ep (the
# course recipe, --lr auto), each through python -m jaxcifar.race with target 90 %; then airbench's own PyTorch
# train94 (airbench94's recipe, 3 seeds) on the same images, as published (CUDA, float16), from the airbench wheel in
# $WHEELS (fetch_wheels.sh builds it); then airbench94_muon.py (3 seeds, compiled, as published) if a copy of that
# script is in $WHEELS (it is not on PyPI: fetch it by hand, ../airbench_torch/run_muon.py says from where).
#
# Environment: OUT (where everything goes; default /tmp/gpu_check), DATA_ARCHIVE (the shared
# cifar10-jpeg.tar.gz; default ../shared/data/cifar10-jpeg.tar.gz, on the device machine a carried copy,
# e.g. .gpu/cifar10-jpeg.tar.gz), PRESET_SEEDS (the seeds of the `preset` step; default 0 1 2 3 4), WHEELS (a folder of wheels for what the device image lacks: tensorboardX,
# tensorflow-datasets' pure-Python deps, nbclient, ...; installed with --no-deps into /tmp/site).
# Each step has its own `timeout`, so one that hangs costs its budget only. Writes OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu_check}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
steps=("$@")
((${#steps[@]})) || steps=(runs float16 bench notebook)

if [[ -n "${WHEELS:-}" ]] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# jaxcifar itself as its wheel lays it out (models/ is jaxcifar.models there; a plain PYTHONPATH would not do)
rm -rf /tmp/jaxcifar-site && mkdir -p /tmp/jaxcifar-site && cp -r jaxcifar /tmp/jaxcifar-site/ &&
    cp -r models /tmp/jaxcifar-site/jaxcifar/models || exit 1
export PYTHONPATH="/tmp/jaxcifar-site${PYTHONPATH:+:$PYTHONPATH}"
export JAXCIFAR_CACHE_DIR="$OUT/cache" MPLBACKEND=Agg PYTHONUNBUFFERED=1
python3 - <<'EOF' | tee "$OUT/versions.txt"
import platform, jax
from importlib.metadata import version
print("python", platform.python_version(), "| jax", jax.__version__, "| flax", version("flax"), "| devices", jax.devices())
EOF

archive="${DATA_ARCHIVE:-../shared/data/cifar10-jpeg.tar.gz}"
data=/tmp/gpu_check_data
if [[ ! -d "$data" ]]; then
    mkdir -p "$data" && tar xzf "$archive" -C "$data" || exit 1
fi
data="$(dirname "$(find "$data" -maxdepth 3 -type d -name train | head -n 1)")"
config=experiments/resnet18_onecycle_20ep/config.json
small=()
[[ "$SMOKE" == 1 ]] && small=(--width 8 --epochs 1 --batch-size 100 --train-subset 1000 --test-subset 500 --lr 0.05)

train() {  # NAME SECONDS FLAGS...: one run of $config (the assignment's unless a step sets it) into OUT/NAME; its last lines into the summary
    local name="$1" limit="$2"
    shift 2
    local started=$SECONDS
    timeout "$limit" python3 -m jaxcifar.train --config "$config" --data-dir "$data" --workdir "$OUT/$name" \
        "${small[@]}" "$@" >"$OUT/$name.log" 2>&1
    local code=$?
    {
        echo "== $name (exit $code, wall $((SECONDS - started)) s): $*"
        grep -E "^(epoch [0-9]+/[0-9]+ |report:|time:|compile:)" "$OUT/$name.log" | tail -n 4
    } | tee -a "$OUT/summary.txt"
}

for step in "${steps[@]}"; do
    case "$step" in
        runs)  # cold caches, then a re-run with warm caches (new workdir: a whole run, not a resume)
            train fp32_cold 240 --report
            train fp32_warm 200 --report
            train bf16_cold 200 --dtype bfloat16
            train bf16_warm 200 --dtype bfloat16
            ;;
        float16)  # dynamic loss scaling: accuracy vs the float32 seeds 0-3 of h200/ (89.53-89.72 %)
            for seed in 0 1; do train "fp16_s$seed" 200 --dtype float16 --seed "$seed"; done
            ;;
        bench)
            extra=()
            [[ "$SMOKE" == 1 ]] && extra=(--width 8 --batch-size 32 --steps 3 --warmup 1)
            for dtype in float32 bfloat16 float16; do
                timeout 240 python3 -m jaxcifar.bench --batch-size 512 --dtype "$dtype" --compare-torch --json \
                    "${extra[@]}" >"$OUT/bench_$dtype.log" 2>&1
                echo "== bench $dtype (exit $?): $(tail -n 1 "$OUT/bench_$dtype.log" | cut -c1-400)" | tee -a "$OUT/summary.txt"
            done
            timeout 300 python3 -m jaxcifar.bench --batch-size 512 --dtype bfloat16 --compare-torch --torch-compile --json \
                "${extra[@]}" >"$OUT/bench_bf16_compile.log" 2>&1
            echo "== bench bfloat16 torch.compile (exit $?)" | tee -a "$OUT/summary.txt"
            ;;
        notebook)  # full mode (no JAXCIFAR_SMOKE): 20 epochs, the executed copy to commit is OUT/notebook.ipynb
            nb_env=(JAXCIFAR_DATA_DIR="$data" JAXCIFAR_WORKDIR="$OUT/notebook_run")
            [[ "$SMOKE" == 1 ]] && nb_env+=(JAXCIFAR_SMOKE=1)
            env "${nb_env[@]}" timeout 400 python3 - "$OUT/notebook.ipynb" <<'EOF'
import sys, time
import nbformat
from nbclient import NotebookClient
nb = nbformat.read("colab/resnet18_cifar10.ipynb", as_version=4)
started = time.monotonic()
NotebookClient(nb, timeout=380, kernel_name="python3").execute()
nbformat.write(nb, sys.argv[1])
print(f"notebook executed in {time.monotonic() - started:.1f} s")
EOF
            echo "== notebook (exit $?)" | tee -a "$OUT/summary.txt"
            ;;
        preset)  # the best-accuracy preset (../resnet18_best): 5 seeds, goal >= 91.5 % mean; its own device call
            (
                config=experiments/resnet18_best/config.json
                for seed in ${PRESET_SEEDS:-0 1 2 3 4}; do train "best_s$seed" 110 --seed "$seed"; done
            )
            ;;
        fast)  # issue 19: the fast presets beside airbench's own code on the same images
            (
                race_small=()
                [[ "$SMOKE" == 1 ]] && race_small=(--width 8 --epochs 2 --train-subset 2000 --test-subset 500 --batch-size 100)
                race() {  # NAME SECONDS FLAGS...: one race into OUT/NAME; its summary line into the summary
                    local name="$1" limit="$2"
                    shift 2
                    timeout "$limit" python3 -m jaxcifar.race --data-dir "$data" --out-dir "$OUT/$name" --target 0.90 \
                        "$@" "${race_small[@]}" >"$OUT/$name.log" 2>&1
                    echo "== $name (exit $?): $* | $(grep -E '^race:' "$OUT/$name.log" | cut -c1-300)" | tee -a "$OUT/summary.txt"
                }
                race race_airbench94 300 --config experiments/airbench94/config.json --dtype bfloat16 --runs 3
                race race_airbench94_muon 300 --config experiments/airbench94_muon/config.json --dtype bfloat16 --runs 3
                race race_resnet9_24ep 300 --config experiments/resnet9_24ep/config.json --dtype bfloat16 --runs 1
                torch_args=(--device cuda --epochs 9.9 --runs 3)
                [[ "$SMOKE" == 1 ]] && torch_args=(--device cpu --epochs 0.2 --width 8 --batch-size 100 --runs 1)
                wheel=("${WHEELS:-.}"/airbench-*.whl)
                [[ -f "${wheel[0]}" ]] && torch_args+=(--airbench-wheel "${wheel[0]}")
                timeout 300 python3 experiments/airbench_torch/run.py --data-dir "$data" --target 0.85 0.90 \
                    --out "$OUT/airbench_torch.json" "${torch_args[@]}" >"$OUT/airbench_torch.log" 2>&1
                echo "== airbench's own train94 (exit $?): $(tail -n 1 "$OUT/airbench_torch.log" | cut -c1-400)" | tee -a "$OUT/summary.txt"
                muon_args=(--device cuda --runs 3)
                [[ "$SMOKE" == 1 ]] && muon_args=(--device cpu --limit 2000 --runs 1)
                if [[ -f "${WHEELS:-.}/airbench94_muon.py" ]]; then  # fetched by hand: it is not on PyPI
                    timeout 300 python3 experiments/airbench_torch/run_muon.py --script "${WHEELS:-.}/airbench94_muon.py" \
                        --data-dir "$data" --target 0.85 0.90 --out "$OUT/airbench_torch_muon.json" "${muon_args[@]}" \
                        >"$OUT/airbench_torch_muon.log" 2>&1
                    echo "== airbench94_muon.py (exit $?): $(tail -n 1 "$OUT/airbench_torch_muon.log" | cut -c1-400)" | tee -a "$OUT/summary.txt"
                else
                    echo "== airbench94_muon.py: not run, no ${WHEELS:-.}/airbench94_muon.py" | tee -a "$OUT/summary.txt"
                fi
            )
            ;;
        *) echo "unknown step $step (runs, float16, bench, notebook, preset, fast)" >&2; exit 2 ;;
    esac
done
rm -rf "$OUT/cache" "$OUT"/*/checkpoints "$OUT"/*/best  # what comes back stays small
