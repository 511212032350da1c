"""PyTorch interop: kuangliu/pytorch-cifar state_dicts <-> jaxcifar variables.

``load_torch_state_dict`` turns a PyTorch ResNet18/34 state_dict with the kuangliu/pytorch-cifar key
layout into ``{"params", "batch_stats"}`` for ``models.get_model(name)``; ``to_torch_state_dict`` is the
reverse. Key correspondence (Flax path on the left, PyTorch key on the right)::

    conv1/kernel                    (3, 3, I, O) HWIO  <->  conv1.weight                (O, I, 3, 3) OIHW
    bn1/scale, bn1/bias                               <->  bn1.weight, bn1.bias
    batch_stats bn1/mean, bn1/var                     <->  bn1.running_mean, bn1.running_var
    layer2_0/conv1, bn1, conv2, bn2                   <->  layer2.0.conv1, bn1, conv2, bn2
    layer2_0/shortcut_conv, shortcut_bn               <->  layer2.0.shortcut.0, layer2.0.shortcut.1
    linear/kernel (in, out), linear/bias              <->  linear.weight (out, in), linear.bias

``bnX.num_batches_tracked`` is ignored on load (Flax keeps no counter; it only matters for PyTorch's
``BatchNorm(momentum=None)``) and written as ``num_batches_tracked`` on export. Checkpoints wrapped as
``{"net": state_dict, "acc": ..., "epoch": ...}`` (kuangliu's ``ckpt.pth``) and keys prefixed ``module.``
(``nn.DataParallel``) are accepted. Any missing, unexpected or wrongly-shaped key fails the whole load
with one ``CheckpointError`` naming them: nothing is loaded partially.

Numerics (tested against PyTorch in tests/test_torch_equivalence.py): the same forward in eval and train
mode, the same Grad-CAM as pytorch-grad-cam, the same SGD + OneCycleLR training steps. One inherent
difference: in train mode PyTorch updates ``running_var`` with the unbiased batch variance
(``n / (n - 1)`` times the biased one that both frameworks normalize with, ``n = B * H * W`` values per
channel); Flax's BatchNorm uses the biased one. Logits, losses, gradients and parameters are unaffected;
running variances accumulated in jaxcifar are smaller by about ``1 / n`` (0.8% at layer4 for a batch of
8, 0.01% for a batch of 512).

torch is an optional dependency (``pip install 'jaxcifar[torch]'``): this module imports it only inside
the functions that need it (``load_torch_checkpoint``, ``to_torch_state_dict``); the rest of jaxcifar
never imports it.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcifar import models
from jaxcifar.errors import CheckpointError

# kuangliu/pytorch-cifar's ``transforms.Normalize`` for CIFAR-10: the std is not CIFAR-10's per-channel
# std (0.2470, 0.2435, 0.2616), but its checkpoints were trained (and must be evaluated) with it.
KUANGLIU_MEAN = (0.4914, 0.4822, 0.4465)
KUANGLIU_STD = (0.2023, 0.1994, 0.2010)

# Flax leaf -> PyTorch suffix: BatchNorm scale/bias (and the Dense bias), BatchNorm running statistics.
_VECTOR_PARAMS = {"scale": "weight", "bias": "bias"}
_BN_STATS = {"mean": "running_mean", "var": "running_var"}
_TORCH_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Module order inside a block, as kuangliu's BasicBlock registers them.
_BLOCK_ORDER = ("conv1", "bn1", "conv2", "bn2", "shortcut_conv", "shortcut_bn")
_TORCH_MODULE = {"shortcut_conv": "shortcut.0", "shortcut_bn": "shortcut.1"}
_BLOCK_RE = re.compile(r"^(layer\d+)_(\d+)$")
_TORCH_BLOCK_RE = re.compile(r"^(layer\d+)\.(\d+)\.")
_WRAPPER_KEYS = ("net", "state_dict", "model")


def _torch_module_name(flax_path: tuple[str, ...]) -> str:
    """``("layer2_0", "shortcut_bn")`` -> ``"layer2.0.shortcut.1"``."""
    parts = []
    for name in flax_path:
        block = _BLOCK_RE.match(name)
        parts.append(f"{block.group(1)}.{block.group(2)}" if block else _TORCH_MODULE.get(name, name))
    return ".".join(parts)


def _module_sort_key(flax_path: tuple[str, ...]) -> tuple:
    """PyTorch's registration order: conv1, bn1, layer1.0 ... layer4.N (conv1, bn1, ..., shortcut), linear."""
    top = flax_path[0]
    block = _BLOCK_RE.match(top)
    if block:
        inner = _BLOCK_ORDER.index(flax_path[1]) if len(flax_path) > 1 and flax_path[1] in _BLOCK_ORDER else 99
        return (1, int(block.group(1)[5:]), int(block.group(2)), inner, flax_path)
    rank = {"conv1": 0, "bn1": 0.5, "linear": 2}.get(top, 3)
    return (rank, 0, 0, 0, flax_path)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dict -> {path tuple: leaf}."""
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, str(key))))
        else:
            flat[(*prefix, str(key))] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """{path tuple: leaf} -> nested dict."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def _torch_entry(collection: str, path: tuple[str, ...], ndim: int) -> tuple[str, str]:
    """Returns (PyTorch key, layout) of a Flax leaf; layout is ``oihw`` (conv), ``oi`` (dense) or ``same``."""
    module, leaf = path[:-1], path[-1]
    name = _torch_module_name(module)
    if collection == "batch_stats" and leaf in _BN_STATS:
        return f"{name}.{_BN_STATS[leaf]}", "same"
    if collection == "params" and leaf == "kernel" and ndim in (2, 4):
        return f"{name}.weight", "oihw" if ndim == 4 else "oi"
    if collection == "params" and leaf in _VECTOR_PARAMS:
        return f"{name}.{_VECTOR_PARAMS[leaf]}", "same"
    raise CheckpointError(f"no PyTorch name for the Flax variable {collection}/{'/'.join(path)}")


def _to_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
    """Flax HWIO kernel -> OIHW, Dense (in, out) -> (out, in); others unchanged."""
    if layout == "oihw":
        return np.transpose(value, (3, 2, 0, 1))
    if layout == "oi":
        return value.T
    return value


def _from_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
    """PyTorch OIHW kernel -> HWIO, Linear (out, in) -> (in, out); others unchanged."""
    if layout == "oihw":
        return np.transpose(value, (2, 3, 1, 0))
    if layout == "oi":
        return value.T
    return value


def _as_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any device, any float dtype) or array-like -> a NumPy array, without importing torch."""
    if hasattr(value, "detach"):  # a torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()  # NumPy has no bfloat16; float32 holds it exactly
        return value.numpy()
    return np.asarray(value)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (state_dict, metadata) of a checkpoint object.

    ``{"net": state_dict, "acc": ..., "epoch": ...}`` (kuangliu's ``ckpt.pth``; also ``"state_dict"`` or
    ``"model"`` instead of ``"net"``) gives the inner state_dict and the other entries as metadata; a bare
    state_dict gives itself and ``{}``. A ``module.`` prefix on every key (``nn.DataParallel``) is removed.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"a PyTorch checkpoint must be a state_dict (a mapping), got {type(checkpoint).__name__}")
    state_dict: Mapping[str, Any] = checkpoint
    meta: dict[str, Any] = {}
    for wrapper in _WRAPPER_KEYS:
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping):
            state_dict = inner
            meta = {k: v for k, v in checkpoint.items() if k != wrapper}
            break
    not_names = [k for k in state_dict if not isinstance(k, str)]
    if not_names:
        more = f" and {len(not_names) - 1} more" if len(not_names) > 1 else ""
        raise CheckpointError(
            "PyTorch state_dict keys must be parameter names (str, e.g. 'conv1.weight'), got "
            f"{type(not_names[0]).__name__} {not_names[0]!r}{more}"
        )
    keys = [str(k) for k in state_dict]
    if keys and all(k.startswith("module.") for k in keys):
        state_dict = {str(k)[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict), meta


def _stage_sizes(keys: list[str]) -> tuple[int, ...]:
    """Blocks per stage found in PyTorch keys (``layer3.5.conv1.weight`` -> stage 3 has >= 6 blocks)."""
    blocks: dict[int, int] = {}
    for key in keys:
        match = _TORCH_BLOCK_RE.match(key)
        if match:
            stage = int(match.group(1)[5:])
            blocks[stage] = max(blocks.get(stage, 0), int(match.group(2)) + 1)
    return tuple(blocks[s] for s in sorted(blocks))


def torch_layout_models() -> tuple[str, ...]:
    """Returns the registry names with kuangliu's PyTorch key layout (the ResNets, which have ``stage_sizes``)."""
    return tuple(n for n in models.available_models() if getattr(models.get_model(n), "stage_sizes", None))


def infer_model_name(state_dict: Mapping[str, Any]) -> str | None:
    """Returns the registry name (e.g. ``"resnet34"``) whose blocks per stage match the keys, else None."""
    found = _stage_sizes(list(unwrap_state_dict(state_dict)[0]))
    for name in torch_layout_models():
        if tuple(models.get_model(name).stage_sizes) == found:
            return name
    return None


def _expected_variables(model: Any) -> dict[str, dict[tuple[str, ...], jax.ShapeDtypeStruct]]:
    """{collection: {path: ShapeDtypeStruct}} of ``model`` for 32x32x3 inputs (``jax.eval_shape``: nothing runs)."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(
        lambda key, images: model.init(key, images, train=False, mutable=["params", "batch_stats"]),
        jax.random.PRNGKey(0),
        x,
    )
    return {col: _flatten(shapes[col]) for col in ("params", "batch_stats") if col in shapes}


def _describe(model_name: str, kwargs: Mapping[str, Any]) -> str:
    details = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()) if k != "dtype")
    return f"{model_name}({details})" if details else model_name


def _numeric_values(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Returns ``{key: NumPy array}``; raises CheckpointError naming every value that is not a real-number tensor."""
    arrays: dict[str, np.ndarray] = {}
    bad: list[str] = []
    for key, value in state_dict.items():
        try:
            array = _as_numpy(value)
        except Exception:  # ragged lists, tensors NumPy cannot take
            array = None
        if array is None or array.dtype.kind not in "biuf":
            dtype = f" of {array.dtype}" if array is not None and hasattr(value, "shape") else ""
            bad.append(f"{key} is {type(value).__name__}{dtype}")
        else:
            arrays[key] = array
    if bad:
        listed = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise CheckpointError(f"PyTorch state_dict values must be tensors or arrays of real numbers: {listed}")
    return arrays


def _leading_dim(arrays: Mapping[str, np.ndarray], key: str, ndim: int, layout: str) -> int:
    """The first dimension of ``arrays[key]`` (width, classes); raises CheckpointError for another rank or 0."""
    shape = tuple(arrays[key].shape)
    if len(shape) != ndim or shape[0] < 1:
        raise CheckpointError(f"{key} must have shape {layout} with a first dimension >= 1, got {shape}")
    return int(shape[0])


def load_torch_state_dict(
    state_dict: Mapping[str, Any], model_name: str | None = None, **model_kwargs: Any
) -> dict[str, dict[str, Any]]:
    """Converts a kuangliu/pytorch-cifar ResNet state_dict into jaxcifar variables.

    ``state_dict`` maps PyTorch keys to tensors (or arrays); kuangliu's ``{"net": ..., "acc", "epoch"}``
    wrapper and a ``module.`` prefix are accepted. ``model_name`` is a ``models`` registry name
    (``resnet18``, ``resnet34``; default: inferred from the blocks per stage); ``model_kwargs`` are
    ``models.get_model`` fields, ``width`` and ``num_classes`` defaulting to the checkpoint's
    (``conv1.weight`` and ``linear.weight`` shapes). Returns ``{"params": ..., "batch_stats": ...}``
    (nested dicts of float32 jax arrays: conv kernels (3, 3, I, O) HWIO, Dense kernel (in, out)) for
    ``models.get_model(model_name, **model_kwargs).apply``. Raises ``CheckpointError`` (one line) listing
    every missing, unexpected and wrongly-shaped key when the state_dict does not fit that model, and for
    malformed input: not a mapping, empty, non-string keys, values that are not real-number tensors or
    arrays, a ``conv1.weight``/``linear.weight`` of another rank or with a zero width/class count.
    """
    torch_dict, _ = unwrap_state_dict(state_dict)
    if not torch_dict:
        raise CheckpointError(
            "the PyTorch state_dict is empty: expected kuangliu ResNet keys (conv1.weight, bn1.weight, ..., "
            "linear.bias)"
        )
    torch_dict = _numeric_values({k: v for k, v in torch_dict.items() if not k.endswith("num_batches_tracked")})
    guessed = infer_model_name(torch_dict)
    if model_name is None:
        if guessed is None:
            found = _stage_sizes(list(torch_dict))
            raise CheckpointError(
                f"cannot tell the model from the state_dict (blocks per stage {found or 'none'}); pass model_name, "
                f"one of {', '.join(torch_layout_models())}"
            )
        model_name = guessed
    kwargs = dict(model_kwargs)
    if "width" not in kwargs and "conv1.weight" in torch_dict:
        kwargs["width"] = _leading_dim(torch_dict, "conv1.weight", 4, "(width, 3, 3, 3)")
    if "num_classes" not in kwargs and "linear.weight" in torch_dict:
        kwargs["num_classes"] = _leading_dim(torch_dict, "linear.weight", 2, "(classes, features)")
    for name in ("width", "num_classes"):
        if name in kwargs and not (isinstance(kwargs[name], int | np.integer) and kwargs[name] >= 1):
            raise CheckpointError(f"{name} must be an integer >= 1, got {kwargs[name]!r}")
    try:
        model = models.get_model(model_name, **kwargs)
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e)) from e
    expected = _expected_variables(model)

    entries: dict[str, tuple[str, tuple[str, ...], str, jax.ShapeDtypeStruct]] = {}
    for collection, leaves in expected.items():
        for path, struct in leaves.items():
            key, layout = _torch_entry(collection, path, len(struct.shape))
            entries[key] = (collection, path, layout, struct)

    missing = [k for k in entries if k not in torch_dict]
    unexpected = sorted(k for k in torch_dict if k not in entries)
    arrays: dict[str, np.ndarray] = {}
    wrong: list[str] = []
    for key, (_, _, layout, struct) in entries.items():
        if key not in torch_dict:
            continue
        value = _as_numpy(torch_dict[key])
        want = _to_torch_layout(np.empty(struct.shape, np.bool_), layout).shape
        if value.shape != want:
            wrong.append(f"{key} {tuple(value.shape)} (expected {tuple(want)})")
        arrays[key] = value
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing: {', '.join(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: {', '.join(unexpected)}")
        if wrong:
            problems.append(f"{len(wrong)} wrongly shaped: {', '.join(wrong)}")
        hint = ""
        if guessed is not None and guessed != model_name:
            hint = f" (the keys look like {guessed}: pass model_name={guessed!r} / --model {guessed})"
        raise CheckpointError(
            f"PyTorch state_dict does not fit {_describe(model_name, kwargs)}: {'; '.join(problems)}{hint}"
        )

    flat: dict[str, dict[tuple[str, ...], Any]] = {col: {} for col in expected}
    for key, (collection, path, layout, struct) in entries.items():
        value = _from_torch_layout(arrays[key], layout)
        flat[collection][path] = jnp.asarray(np.array(value, dtype=struct.dtype, order="C", copy=True))
    return {col: _unflatten(leaves) for col, leaves in flat.items()}


def to_torch_state_dict(variables: Any, num_batches_tracked: int = 0) -> collections.OrderedDict[str, Any]:
    """Converts jaxcifar variables into a kuangliu/pytorch-cifar state_dict of torch tensors.

    ``variables`` is ``{"params", "batch_stats"}`` of ``models.ResNet18/34``, or a ``TrainState`` (its
    ``params``; for EMA weights pass ``state.variables(ema=True)``).
    Returns an ``OrderedDict`` in PyTorch's ``state_dict()`` key order of CPU tensors of the variables'
    dtype (float32 for jaxcifar's; conv weights (O, I, 3, 3) OIHW, ``linear.weight`` (out, in)) plus an
    int64 scalar ``num_batches_tracked`` per
    BatchNorm, set to ``num_batches_tracked`` (Flax keeps no counter; PyTorch uses it only with
    ``momentum=None``). ``model.load_state_dict(...)`` of a kuangliu ResNet accepts it with strict=True.
    Needs torch. Raises ``CheckpointError`` for a variable with no PyTorch counterpart.
    """
    import torch  # optional dependency: only here

    if hasattr(variables, "params") and hasattr(variables, "batch_stats"):
        variables = {"params": variables.params, "batch_stats": variables.batch_stats}
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise CheckpointError("variables must be {'params': ..., 'batch_stats': ...} or a TrainState")
    entries: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for collection in ("params", "batch_stats"):
        for path, value in _flatten(variables.get(collection) or {}).items():
            array = np.asarray(jax.device_get(value))
            key, layout = _torch_entry(collection, path, array.ndim)
            suffix = key.rsplit(".", 1)[1]
            entries.setdefault(path[:-1], {})[suffix] = _to_torch_layout(array, layout)
    state_dict: collections.OrderedDict[str, Any] = collections.OrderedDict()
    for module_path in sorted(entries, key=_module_sort_key):
        name = _torch_module_name(module_path)
        leaves = entries[module_path]
        if "running_mean" in leaves:
            leaves["num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
        for suffix in sorted(leaves, key=_TORCH_LEAF_ORDER.index):
            state_dict[f"{name}.{suffix}"] = torch.from_numpy(np.array(leaves[suffix], order="C", copy=True))
    return state_dict


def load_torch_checkpoint(
    path: str | Path, model_name: str | None = None, **model_kwargs: Any
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Reads a PyTorch checkpoint file (``torch.save``) and converts it with ``load_torch_state_dict``.

    Returns (``{"params", "batch_stats"}``, metadata): the metadata holds the wrapper's other entries
    (kuangliu's ``acc`` and ``epoch``) plus ``model`` (the model name used), ``width`` and
    ``num_classes``. Loads with ``torch.load(..., map_location="cpu", weights_only=True)`` (no code from
    the file is run). Needs torch. Raises ``CheckpointError`` for a missing or unreadable file or a
    state_dict that does not fit the model.
    """
    try:
        import torch  # optional dependency: only here
    except ImportError as e:
        raise CheckpointError(
            "reading a PyTorch checkpoint needs torch: pip install 'jaxcifar[torch]' (or pip install torch)"
        ) from e
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"PyTorch checkpoint {path} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types (pickle, zip, weights_only refusals)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read PyTorch checkpoint {path}: {first_line}") from e
    state_dict, meta = unwrap_state_dict(checkpoint)
    variables = load_torch_state_dict(state_dict, model_name, **model_kwargs)
    name = model_name or infer_model_name(state_dict)
    meta = {k: v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v for k, v in meta.items()}
    meta.update(
        model=name,
        width=int(variables["params"]["conv1"]["kernel"].shape[-1]),
        num_classes=int(variables["params"]["linear"]["kernel"].shape[-1]),
    )
    return variables, meta
