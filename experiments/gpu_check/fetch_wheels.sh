#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the Python 3.12 wheels that the device image lacks for run.sh:
# tensorboardX and the notebook runner (nbclient, ipykernel and their pure-Python dependencies), 36 wheels,
# ~16 MB. The image's own numpy, protobuf and packaging are used as they are. Checked on 2026-11-26: installed
# with --no-deps --target into a bare Python 3.12 (plus numpy, protobuf, packaging), they execute a notebook.
#
#   bash experiments/gpu_check/fetch_wheels.sh .gpu/whl
set -euo pipefail
dest="${1:?usage: fetch_wheels.sh DEST}"
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" \
    tensorboardX nbclient nbformat ipykernel jupyter_client jupyter_core traitlets pyzmq tornado fastjsonschema \
    jsonschema jsonschema-specifications referencing rpds-py attrs ipython comm debugpy nest_asyncio psutil \
    python-dateutil matplotlib-inline decorator jedi parso pexpect ptyprocess prompt_toolkit wcwidth pygments \
    stack_data asttokens executing pure_eval ipython_pygments_lexers platformdirs typing_extensions
# airbench (the `fast` step's reference code) is on PyPI as a source archive only: build its pure-Python wheel here
python3 -m pip wheel -q --no-deps --no-build-isolation airbench==0.1.8 -w "$dest"
# airbench94_muon.py (run.sh fast runs it when it is here) is not on PyPI: copy it into "$dest" by hand from
# KellerJordan/cifar10-airbench at f1c599c (experiments/airbench_torch/run_muon.py checks its SHA-256)
ls "$dest" | wc -l
