"""Applies each mutation of augment.md, runs the test that should catch it, prints the row, restores the file.

Usage: python experiments/test_mutations/augment_mutate.py [ROW ...]  (all rows without arguments)
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARPNESS_SKIPPED = "_COLOUR_KERNELS = (_brightness, _saturation, _contrast, lambda image, r, a: image)"
ROUNDED_FIRST = "return _to_uint8(image.astype(F32) * ratio + other * alpha)"
RECIPROCAL = (
    "    inv = jnp.where(span == 0, 1.0, span * F32(1.0 / 255.0))\n"
    "    return _to_uint8(offset.astype(F32) * (1.0 / inv))"
)
HALF_UP = "sample(jnp.floor(px + 0.5).astype(jnp.int32), jnp.floor(py + 0.5).astype(jnp.int32))"
MUTATIONS = [
    (
        "TrivialAugmentWide Rotate table 0..120 instead of 0..135",
        "jaxcifar/autoaugment.py",
        '"Rotate": torch_linspace(0.0, 135.0, bins)',
        '"Rotate": torch_linspace(0.0, 120.0, bins)',
        "tests/test_augment_ops.py",
        "magnitude_tables or trivialaugment_draws",
    ),
    (
        "AutoAugment sub-policy 2: Rotate bin 2 -> 3",
        "jaxcifar/autoaugment.py",
        '(("Rotate", 0.7, 2), ("TranslateX", 0.3, 9))',
        '(("Rotate", 0.7, 3), ("TranslateX", 0.3, 9))',
        "tests/test_augment_ops.py",
        "magnitude_tables or autoaugment_draws",
    ),
    (
        "policy apply skips the last drawn step",
        "jaxcifar/autoaugment.py",
        "(ops.T, magnitudes.T))[0]",
        "(ops.T[:-1], magnitudes.T[:-1]))[0]",
        "tests/test_augment_ops.py",
        "policy_applies_every_drawn_step",
    ),
    (
        "apply_op: Sharpness skipped (returns the image)",
        "jaxcifar/augment_ops.py",
        "_COLOUR_KERNELS = (_brightness, _saturation, _contrast, _sharpness)",
        SHARPNESS_SKIPPED,
        "tests/test_augment_ops.py",
        "each_auto_augment_op",
    ),
    (
        "signed magnitudes never negated",
        "jaxcifar/autoaugment.py",
        "negate = jax.random.bernoulli(key, 0.5, ops.shape)",
        "negate = jax.random.bernoulli(key, 0.0, ops.shape)",
        "tests/test_augment_ops.py",
        "randaugment_draws",
    ),
    (
        "blend without the fused multiply-add (product rounded first)",
        "jaxcifar/augment_ops.py",
        "return _to_uint8(_fused_multiply_add(other, alpha, image.astype(F32) * ratio))",
        ROUNDED_FIRST,
        "tests/test_augment_ops.py",
        "blends_equal",
    ),
    (
        "autocontrast divides by multiplying with the reciprocal",
        "jaxcifar/augment_ops.py",
        "    return jnp.asarray(_AUTOCONTRAST)[span, offset]",
        RECIPROCAL,
        "tests/test_augment_ops.py",
        "integer_ops",
    ),
    (
        "nearest warp rounds half up (floor(x + 0.5)) instead of half to even",
        "jaxcifar/augment_ops.py",
        "sample(jnp.round(px).astype(jnp.int32), jnp.round(py).astype(jnp.int32))",
        HALF_UP,
        "tests/test_augment_ops.py",
        "affine_equals and nearest",
    ),
    (
        "random erasing: a box may be as large as the image (<= instead of <)",
        "jaxcifar/augment_ops.py",
        "fits = (heights < h) & (widths < w)",
        "fits = (heights <= h) & (widths <= w)",
        "tests/test_augment_ops.py",
        "random_erasing_matches",
    ),
    (
        "random erasing scale range 0.02..0.4",
        "jaxcifar/augment_ops.py",
        "scale: tuple[float, float] = (0.02, 0.33),",
        "scale: tuple[float, float] = (0.02, 0.4),",
        "tests/test_augment_ops.py",
        "random_erasing_matches",
    ),
    (
        "pipeline skips the policy",
        "jaxcifar/augmentation.py",
        "    images = autoaugment.augment(policy_key, images, spec.policy)\n",
        "",
        "tests/test_augmentation.py",
        "change_most_images",
    ),
    (
        "coarse dropout fills black instead of the mean",
        "jaxcifar/augmentation.py",
        "            mean_levels(mean),\n        )",
        "            0.0,\n        )",
        "tests/test_augmentation.py",
        "mean",
    ),
]
only = set(int(a) for a in sys.argv[1:])
out = []
for i, (what, path, old, new, test, k) in enumerate(MUTATIONS):
    if only and i not in only:
        continue
    p = REPO / path
    src = p.read_text()
    assert src.count(old) == 1, (what, src.count(old))
    p.write_text(src.replace(old, new))
    try:
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "slow or not slow", test, "-k", k]
        r = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    finally:
        p.write_text(src)
    lines = r.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAILED")]
    msg = next((line.strip() for line in lines if line.strip().startswith("E ")), "")
    row = f"| {what} | `{path}` | {failed[0].split(' ')[1] if failed else 'NOT CAUGHT'} | {msg[:300]} |"
    print(row, flush=True)
    out.append(row)
