"""Augmentation ops and policies against torchvision.transforms.v2 (0.29) on 64 shared CIFAR-10 images.

Each op gets the same parameters on both sides (one per image). Integer ops (Invert, Posterize, Solarize,
AutoContrast, Equalize) and the auto-augment ops as the policies call them are exact. Elsewhere torchvision's
own rounding differs in two named ways, and the tests allow exactly those:

- FACTOR_ROUNDING: a blend given a per-image float32 factor array computes ``1 - factor`` in float32,
  torchvision in float64 from a Python float; the truncation to uint8 then differs by 1 level at a few
  pixels (the policies pass ``-magnitude``, which is exact, and match bit for bit);
- BILINEAR_ROUNDING: bilinear weights summed in another order round to the other side of .5 (1 level).

Nearest sampling is exact except where a source coordinate lies on a rounding tie (NEAREST_TIE: within
1e-4 of .5 in float64), where float32 noise picks either neighbour on either side; the test names them.
Needs torch: skipped without it, failing instead when JAXCIFAR_REQUIRE_TORCH=1 (CI).
"""

from __future__ import annotations

import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.torch_support import require

pytestmark = pytest.mark.torch
torch = require("torch")
tv2 = require("torchvision.transforms.v2")

from PIL import Image  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix  # noqa: E402

from jaxcifar import augment_ops as A  # noqa: E402
from jaxcifar import autoaugment  # noqa: E402

N = 64
BILINEAR = tv2.InterpolationMode.BILINEAR


@pytest.fixture(scope="module")
def images(shared_data_dir: Path) -> np.ndarray:
    """uint8 (64, 32, 32, 3): the first 7 (6 for the last classes) training images of each class."""
    classes = sorted(p for p in (shared_data_dir / "train").iterdir() if p.is_dir())
    files = [f for c in classes for f in sorted(c.glob("*.jpg"))[:7]][:N]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def _torch(images: np.ndarray, fn, params) -> np.ndarray:
    """torchvision's ``fn(image, param)`` per image, back as (N, H, W, C) uint8."""
    t = torch.from_numpy(images).permute(0, 3, 1, 2)
    return np.stack([fn(t[i], p).permute(1, 2, 0).numpy() for i, p in enumerate(params)])


def _levels(ours: jax.Array, want: np.ndarray) -> np.ndarray:
    chex.assert_type(ours, jnp.uint8)
    chex.assert_shape(ours, want.shape)
    return np.abs(np.asarray(ours).astype(int) - want.astype(int))


def _spread(low: float, high: float) -> np.ndarray:
    return np.linspace(low, high, N, dtype=np.float32)


INTEGER_OPS = {
    "invert": (lambda x, p: A.invert(x), lambda i, p: TF.invert(i), np.zeros(N)),
    "posterize": (A.posterize, lambda i, p: TF.posterize(i, int(p)), np.arange(N) % 9),
    "solarize": (A.solarize, lambda i, p: TF.solarize(i, float(p)), _spread(0.0, 255.0)),
    "autocontrast": (lambda x, p: A.autocontrast(x), lambda i, p: TF.autocontrast(i), np.zeros(N)),
    "equalize": (lambda x, p: A.equalize(x), lambda i, p: TF.equalize(i), np.zeros(N)),
}


@pytest.mark.parametrize("name", INTEGER_OPS)
def test_integer_ops_equal_torchvision_exactly(images, name):
    ours, theirs, params = INTEGER_OPS[name]
    diff = _levels(jax.jit(ours)(jnp.asarray(images), jnp.asarray(params)), _torch(images, theirs, params))
    assert diff.max() == 0, f"{name}: {np.count_nonzero(diff)} values differ (max {diff.max()} levels)"


FACTOR_OPS = {
    "brightness": (A.adjust_brightness, TF.adjust_brightness),
    "saturation": (A.adjust_saturation, TF.adjust_saturation),
    "contrast": (A.adjust_contrast, TF.adjust_contrast),
    "sharpness": (A.adjust_sharpness, TF.adjust_sharpness),
}


@pytest.mark.parametrize("name", FACTOR_OPS)
def test_blends_equal_torchvision_within_one_level(images, name):
    """Per-image factors from 0 to 2 (FACTOR_ROUNDING: at most 1 level on at most 1 % of the values)."""
    ours, theirs = FACTOR_OPS[name]
    factors = _spread(0.0, 2.0)
    diff = _levels(jax.jit(ours)(jnp.asarray(images), jnp.asarray(factors)), _torch(images, theirs, factors))
    assert diff.max() <= 1 and np.mean(diff > 0) <= 0.01, f"{name}: max {diff.max()}, {np.mean(diff > 0):.4f}"
    # a Python factor takes torchvision's float64 1 - factor: bit for bit
    same = _torch(images, lambda i, p: theirs(i, 1.3), factors)
    np.testing.assert_array_equal(np.asarray(ours(jnp.asarray(images), 1.3)), same)


def _affine_params(i: int) -> tuple[float, list[int], float, list[float]]:
    """Image i's (angle, translate, scale, shear): 16 angles incl. +-90 and 180, shifts, scales, shears; every
    8th a zoom by 2 alone (scale 2 or 0.5: every source coordinate an exact tie, rounded half to even)."""
    if i % 8 == 7:
        return 0.0, [i % 3 - 1, 0], [2.0, 0.5][(i // 8) % 2], [0.0, 0.0]
    angle = float([0, 90, -90, 180, 13.3, -47.0, 135.0, 30.0][i % 8] + (i // 32) * 7.5)
    return angle, [i % 7 - 3, (i * 5) % 9 - 4], [1.0, 0.8, 1.25, 1.1][i % 4], [float(i % 5) * 4.0, -float(i % 3) * 5.0]


def _nearest_ties(params: tuple, height: int = 32, width: int = 32) -> np.ndarray:
    """bool (H, W): output pixels whose float64 source coordinate is within 1e-4 of a rounding tie but not
    exactly on it (NEAREST_TIE; exact ties are exact in float32 too, and both sides round them half to even)."""
    angle, translate, scale, shear = params
    m = _get_inverse_affine_matrix([0.0, 0.0], angle, [float(t) for t in translate], scale, shear)
    xs, ys = np.meshgrid(np.arange(width) - (width - 1) / 2, np.arange(height) - (height - 1) / 2)
    px = m[0] * xs + m[1] * ys + m[2] + (width - 1) / 2
    py = m[3] * xs + m[4] * ys + m[5] + (height - 1) / 2
    near = [(np.abs(p - np.floor(p) - 0.5) < 1e-4) & (p - np.floor(p) != 0.5) for p in (px, py)]
    return near[0] | near[1]


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("fill", [None, (0, 100, 200)])
def test_affine_equals_torchvision(images, interpolation, fill):
    """Rotation, translation, scale and shear together, per image; nearest exact but NEAREST_TIE pixels,
    bilinear within 1 level (BILINEAR_ROUNDING); ``fill`` outside, or torchvision's ``fill=None``."""
    params = [_affine_params(i) for i in range(N)]
    cols = list(zip(*[(a, t[0], t[1], s, sh[0], sh[1]) for a, t, s, sh in params], strict=True))
    angle, tx, ty, scale, sx, sy = (jnp.asarray(np.float32(c)) for c in cols)
    ours = jax.jit(A.affine, static_argnums=(5, 6))(images, angle, (tx, ty), scale, (sx, sy), interpolation, fill)
    mode = tv2.InterpolationMode(interpolation)
    want = _torch(
        images,
        lambda i, p: TF.affine(i, p[0], p[1], p[2], p[3], interpolation=mode, fill=list(fill) if fill else None),
        params,
    )
    diff = _levels(ours, want)
    if interpolation == "bilinear":
        assert diff.max() <= 1, f"bilinear affine: max {diff.max()} levels"
        return
    for i in range(N):
        off = diff[i].max(-1) > 0
        assert not (off & ~_nearest_ties(params[i])).any(), f"image {i} {params[i]}: {off.sum()} pixels off a tie"


def test_rotate_by_quarter_turns_is_rot90(images):
    """torchvision's rotate takes rot90 for multiples of 90 degrees; ours computes them exactly."""
    x = jnp.asarray(np.repeat(images[:4], 6, axis=0))
    k = np.tile(np.arange(-2, 4), 4)
    want = np.stack([np.rot90(image, turns, axes=(0, 1)) for image, turns in zip(np.asarray(x), k, strict=True)])
    np.testing.assert_array_equal(np.asarray(jax.jit(A.rotate)(x, jnp.asarray(90.0 * k, jnp.float32))), want)


GEOMETRIC = {
    "ShearX": (-0.99, 0.99),
    "ShearY": (-0.99, 0.99),
    "TranslateX": (-32.0, 32.0),
    "TranslateY": (-32.0, 32.0),
    "Rotate": (-135.0, 135.0),
}
COLOUR = {
    "Identity": (0.0, 0.0),
    "Brightness": (-0.99, 0.99),
    "Color": (-0.99, 0.99),
    "Contrast": (-0.99, 0.99),
    "Sharpness": (-0.99, 0.99),
    "Posterize": (0.0, 8.99),
    "Solarize": (0.0, 1.0),
    "AutoContrast": (0.0, 0.0),
    "Equalize": (0.0, 0.0),
    "Invert": (0.0, 0.0),
}


def _torchvision_ops(images: np.ndarray, names, magnitudes, interpolation: str = "nearest", fill=None):
    """torchvision's auto-augment op dispatch (``_apply_image_or_video_transform``) per image and step."""
    policy = tv2.TrivialAugmentWide(interpolation=tv2.InterpolationMode(interpolation), fill=fill)
    t = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = []
    for i in range(len(images)):
        x = t[i]
        for name, m in zip(names[i], magnitudes[i], strict=True):
            x = policy._apply_image_or_video_transform(x, name, float(m), policy.interpolation, policy._fill)
        out.append(x.permute(1, 2, 0).numpy())
    return np.stack(out)


@pytest.mark.parametrize("name", list(GEOMETRIC) + list(COLOUR))
def test_each_auto_augment_op_equals_torchvision(images, name):
    """``apply_op`` with one op for all 64 images at 64 magnitudes over its signed range: exact."""
    low, high = {**GEOMETRIC, **COLOUR}[name]
    magnitudes = _spread(low, high)
    ours = _apply_op(jnp.asarray(images), jnp.full((N,), A.OP_INDEX[name]), jnp.asarray(magnitudes))
    want = _torchvision_ops(images, [[name]] * N, magnitudes[:, None])
    diff = _levels(ours, want)
    assert diff.max() == 0, f"{name}: {np.count_nonzero(diff.max(-1))} pixels differ, max {diff.max()} levels"


_apply_op = jax.jit(A.apply_op, static_argnums=(3, 4))


def _reference_tables(tv_policy, bins: int) -> dict[str, tuple[np.ndarray | None, bool]]:
    return {
        name: (None if (m := fn(bins, 32, 32)) is None else m.numpy().astype(np.float32), signed)
        for name, (fn, signed) in tv_policy._AUGMENTATION_SPACE.items()
    }


SPACES = {
    "autoaugment": (lambda: tv2.AutoAugment(tv2.AutoAugmentPolicy.CIFAR10), autoaugment.autoaugment_space, 10),
    "randaugment": (tv2.RandAugment, autoaugment.randaugment_space, 31),
    "trivialaugment": (tv2.TrivialAugmentWide, autoaugment.trivialaugment_space, 31),
}


@pytest.mark.parametrize("policy", SPACES)
def test_magnitude_tables_equal_torchvision(policy):
    """Each policy's ops, signed ops and magnitude table (bins, 32x32 images) are torchvision's value for value."""
    make, space, bins = SPACES[policy]
    names, table = space(bins)
    reference = _reference_tables(make(), bins)
    assert names == tuple(reference)
    for name, (values, signed) in reference.items():
        assert signed == (name in autoaugment.SIGNED_OPS), name
        mine = table[A.OP_INDEX[name]]
        np.testing.assert_array_equal(mine, np.zeros(bins) if values is None else values, err_msg=f"{policy} {name}")
    if policy == "autoaugment":
        assert autoaugment.CIFAR10_POLICY == tuple(make()._policies)


# AutoAugment (two steps) in the quick tier; the others compile another scan each (slow tier).
POLICY_SPECS = [
    autoaugment.PolicySpec("autoaugment"),
    pytest.param(autoaugment.PolicySpec("randaugment", num_ops=3, magnitude=14), marks=pytest.mark.slow),
    pytest.param(autoaugment.PolicySpec("trivialaugment"), marks=pytest.mark.slow),
    pytest.param(
        autoaugment.PolicySpec("trivialaugment", interpolation="bilinear", fill=(10.0, 20.0, 30.0)),
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("spec", POLICY_SPECS, ids=lambda s: f"{s.name}-{s.interpolation}")
def test_policy_applies_every_drawn_step_as_torchvision(images, spec):
    """Our draws, applied by us and step by step by torchvision's op dispatch: exact for nearest,
    within 1 level for bilinear (BILINEAR_ROUNDING)."""
    ops, magnitudes = autoaugment.sample(jax.random.PRNGKey(7), N, spec)
    chex.assert_shape([ops, magnitudes], (N, spec.steps))
    ours = jax.jit(autoaugment.apply, static_argnums=3)(jnp.asarray(images), ops, magnitudes, spec)
    names = [[A.OP_NAMES[o] for o in row] for row in np.asarray(ops)]
    fill = list(spec.fill) if spec.fill else None
    diff = _levels(ours, _torchvision_ops(images, names, np.asarray(magnitudes), spec.interpolation, fill))
    assert diff.max() <= (1 if spec.interpolation == "bilinear" else 0), f"max {diff.max()} levels"
    assert (np.asarray(ops) != A.OP_INDEX["Identity"]).mean() > 0.4  # the test saw real ops


# ------------------------------------------------------------------------------------------------------------
# Frequencies: many draws against torchvision's tables.

DRAWS = 40_000


def _observed(spec: autoaugment.PolicySpec) -> dict[tuple[str, float], float]:
    ops, magnitudes = jax.jit(autoaugment.sample, static_argnums=(1, 2))(jax.random.PRNGKey(3), DRAWS, spec)
    ops, magnitudes = np.asarray(ops).ravel(), np.asarray(magnitudes).ravel()
    keys, counts = np.unique(np.stack([ops, np.abs(magnitudes)]), axis=1, return_counts=True)
    negative = magnitudes < 0
    for name in autoaugment.SIGNED_OPS:  # signs: half negative where the op has a non-zero magnitude
        mask = (ops == A.OP_INDEX[name]) & (magnitudes != 0)
        if mask.sum() > 200:
            assert abs(negative[mask].mean() - 0.5) < 5 * 0.5 / math.sqrt(mask.sum()), f"{name} sign"
    return {(A.OP_NAMES[int(o)], float(m)): c / len(ops) for (o, m), c in zip(keys.T, counts, strict=True)}


def _assert_frequencies(observed: dict, expected: dict, draws: int) -> None:
    expected = {k: v for k, v in expected.items() if v > 0}
    assert set(observed) == set(expected), (
        f"unexpected {set(observed) - set(expected)}, missing {set(expected) - set(observed)}"
    )
    for key, p in expected.items():
        sigma = math.sqrt(p * (1 - p) / draws)
        assert abs(observed[key] - p) < 5 * sigma + 1e-9, f"{key}: observed {observed[key]:.4f}, expected {p:.4f}"


def test_autoaugment_draws_follow_the_cifar10_policy():
    """Per step, P(op, |magnitude|) = sum over the 25 sub-policies of 1/25 * probability (Identity: the rest)."""
    reference = tv2.AutoAugment(tv2.AutoAugmentPolicy.CIFAR10)
    tables = _reference_tables(reference, 10)
    expected: dict[tuple[str, float], float] = {}
    for sub in reference._policies:
        for name, probability, index in sub:
            values = tables[name][0]
            key = (name, float(values[index]) if values is not None else 0.0)
            expected[key] = expected.get(key, 0.0) + probability / 25 / 2
            expected[("Identity", 0.0)] = expected.get(("Identity", 0.0), 0.0) + (1 - probability) / 25 / 2
    _assert_frequencies(_observed(autoaugment.PolicySpec("autoaugment")), expected, 2 * DRAWS)


@pytest.mark.parametrize("num_ops, magnitude", [(2, 9), (1, 30)])
def test_randaugment_draws_uniform_ops_at_the_fixed_magnitude(num_ops, magnitude):
    tables = _reference_tables(tv2.RandAugment(), 31)
    expected = {(n, float(v[magnitude]) if v is not None else 0.0): 1 / len(tables) for n, (v, _) in tables.items()}
    spec = autoaugment.PolicySpec("randaugment", num_ops=num_ops, magnitude=magnitude)
    _assert_frequencies(_observed(spec), expected, num_ops * DRAWS)


def test_trivialaugment_draws_uniform_ops_and_bins():
    tables = _reference_tables(tv2.TrivialAugmentWide(), 31)
    expected: dict[tuple[str, float], float] = {}
    for name, (values, _) in tables.items():
        for b in range(31):
            key = (name, float(values[b]) if values is not None else 0.0)
            expected[key] = expected.get(key, 0.0) + 1 / len(tables) / 31
    _assert_frequencies(_observed(autoaugment.PolicySpec("trivialaugment")), expected, DRAWS)


# ------------------------------------------------------------------------------------------------------------
# Random erasing against torchvision's RandomErasing parameters.


def test_random_erasing_matches_torchvision_distribution():
    """Erased boxes (p = 0.7, default scale and ratio) against 2,000 draws of torchvision's ``make_params``:
    the share of images erased and the mean box height, width and area agree within 5 standard errors."""
    n, h, w = 2000, 32, 32
    images = jnp.full((n, h, w, 1), 255, jnp.uint8)
    out = np.asarray(jax.jit(A.random_erasing, static_argnums=(2,))(jax.random.PRNGKey(0), images, 0.7))
    erased = out[..., 0] == 0
    rows, cols = erased.any(2).sum(1), erased.any(1).sum(1)
    np.testing.assert_array_equal(erased.sum((1, 2)), rows * cols)  # one rectangle each
    assert rows.max() < h and cols.max() < w  # torchvision keeps only boxes strictly inside the image
    torch.manual_seed(0)
    reference = tv2.RandomErasing(p=1.0)
    boxes = np.array([[p["h"], p["w"]] for p in (reference.make_params([torch.zeros(1, h, w)]) for _ in range(n))])
    active = rows > 0
    assert abs(active.mean() - 0.7) < 5 * math.sqrt(0.21 / n)
    for ours, theirs, what in [(rows[active], boxes[:, 0], "height"), (cols[active], boxes[:, 1], "width")]:
        se = math.sqrt(ours.var() / len(ours) + theirs.var() / len(theirs))
        assert abs(ours.mean() - theirs.mean()) < 5 * se, f"{what}: {ours.mean():.2f} vs {theirs.mean():.2f}"
    areas = rows[active] * cols[active]
    ref_areas = boxes.prod(1)
    se = math.sqrt(areas.var() / len(areas) + ref_areas.var() / len(ref_areas))
    assert abs(areas.mean() - ref_areas.mean()) < 5 * se


def test_erase_equals_torchvision(images):
    x = jnp.asarray(images)
    top, left, hh, ww = (np.arange(N) % 9, np.arange(N) % 13, 1 + np.arange(N) % 20, 2 + np.arange(N) % 17)
    ours = A.erase(x, top, left, hh, ww, (1, 2, 3))
    params = list(zip(top, left, hh, ww, strict=True))
    value = torch.tensor([1, 2, 3], dtype=torch.uint8)[:, None, None]
    want = _torch(images, lambda i, p: TF.erase(i, int(p[0]), int(p[1]), int(p[2]), int(p[3]), value), params)
    assert _levels(ours, want).max() == 0
