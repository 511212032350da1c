"""Data parallelism on 8 fake CPU devices (a subprocess: the device count is fixed at JAX start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, tempfile
    import jax
    import numpy as np
    from jaxcifar import Config, ConfigError, fit

    config = Config(data_source="synthetic", width=4, epochs=1, batch_size=32, eval_batch_size=64,
                    train_subset=128, test_subset=64, lr=0.002, log_every=2)
    out = {"devices": jax.device_count(), "history": {}, "params": {}}
    for n in (1, 8):
        result = fit(config.replace(num_devices=n, workdir=tempfile.mkdtemp() + "/run"), verbose=(n == 8))
        out["history"][n] = {k: v for k, v in result.history[0].items() if k.endswith(("loss", "acc"))}
        out["params"][n] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(result.state.params)])
        out["sharding"] = str(result.state.params["conv1"]["kernel"].sharding.spec)
    p1, p8 = out.pop("params").values()
    out["max_param_diff"] = float(np.abs(p1 - p8).max())
    out["param_scale"] = float(np.abs(p1).max())
    try:
        fit(config.replace(batch_size=30, workdir=tempfile.mkdtemp() + "/bad"), verbose=False)
    except ConfigError as e:
        out["error"] = str(e)
    print("RESULT " + json.dumps(out))
    """
)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


@pytest.fixture(scope="module")
def eight_devices():
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), result.stdout


def test_eight_devices_equal_one_device(eight_devices):
    """The same run (4 steps, same global batches) on 1 and on 8 devices: same losses, accuracies and
    parameters. BatchNorm statistics cover the global batch; only the float summation order differs.
    The LR is small because a fresh width-4 net amplifies float-order noise chaotically at large steps
    (seen: 1e-4 relative after 4 steps at LR 0.02; per-device BatchNorm would differ far more at step 1)."""
    out, stdout = eight_devices
    assert out["devices"] == 8
    assert "devices: 8 x cpu" in stdout
    one, eight = out["history"]["1"], out["history"]["8"]
    assert set(one) == {"train_loss", "train_acc", "test_loss", "test_acc"}
    for key in one:
        assert one[key] == pytest.approx(eight[key], rel=1e-5), key
    assert out["max_param_diff"] <= 5e-5 * out["param_scale"]
    assert out["sharding"] in ("P()", "PartitionSpec()")  # params replicated


def test_batch_not_divisible_by_devices_is_a_clear_error(eight_devices):
    out, _ = eight_devices
    assert out["error"].startswith("--batch-size 30 is not divisible by the 8 devices")


def test_distributed_initialize_single_process(tmp_path):
    """--distributed calls jax.distributed.initialize() from the JAX_* environment (one local process)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **ENV,
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "1",
        "JAX_PROCESS_ID": "0",
    }
    code = (
        "import jax; from jaxcifar import Config, fit; "
        "fit(Config(data_source='synthetic', width=4, epochs=1, batch_size=64, train_subset=64, test_subset=64, "
        f"schedule='constant', distributed=True, workdir={str(tmp_path / 'run')!r})); "
        "print('initialized', jax.distributed.is_initialized(), jax.process_count())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialized True 1" in result.stdout and "devices: 1 x cpu" in result.stdout
