"""The names a run configuration may use: models, dtypes, data sources, augmentations, optimizers, schedules.

One tuple per ``Config`` field with a fixed set of values, in the order the CLI lists them. ``jaxcifar.config``
validates against them without importing jax or flax (this module imports nothing); the modules that implement
the names either take their tuple from here (``transforms.PAD_MODES``, ``backend.CONV_IMPLS``, ...) or hold a
registry that ``tests/test_names.py`` (and, for the models, ``jaxcifar.models`` at import) checks against it.
Adding a model, policy or mode is one entry here and one in its registry.
"""

from __future__ import annotations

# Config.model: the keys of jaxcifar.models' registry, sorted.
MODELS = ("airbench", "resnet18", "resnet34", "resnet9")
# Config.dtype: the keys of jaxcifar.models.COMPUTE_DTYPES.
DTYPES = ("float32", "bfloat16", "float16")
# Config.conv_impl (jaxcifar.backend).
CONV_IMPLS = ("auto", "lax", "matmul")
# Config.dataset (jaxcifar.data, jaxcifar.sources).
DATASETS = ("cifar10", "cifar100")
# Config.data_source (jaxcifar.data).
DATA_SOURCES = ("auto", "tfds", "cifar-python", "folder", "synthetic")
# Config.augment (jaxcifar.transforms.augment).
AUGMENT_MODES = ("none", "flip", "crop-flip", "crop-flip-cutout")
# Config.pad_mode (jaxcifar.transforms.pad_images).
PAD_MODES = ("zeros", "reflect")
# Config.policy (jaxcifar.autoaugment).
POLICIES = ("none", "autoaugment", "randaugment", "trivialaugment")
# Config.interpolation (jaxcifar.augment_ops).
INTERPOLATIONS = ("nearest", "bilinear")
# Config.random_erasing_fill (jaxcifar.augmentation).
FILLS = ("black", "mean")
# Config.tta: the keys of jaxcifar.transforms' table of views.
TTA_MODES = ("none", "flip", "flip-translate", "multi-crop")
# Config.optimizer (jaxcifar.optim).
OPTIMIZERS = ("sgd", "adam", "adamw")
# Config.schedule (jaxcifar.optim.make_schedule).
SCHEDULES = ("onecycle", "linear-onecycle", "cosine", "multistep", "warmup-cosine", "linear", "constant")
