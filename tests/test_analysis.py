"""Split-wide predictions (padding), misclassified ordering, confusion matrix and per-class accuracy."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcifar import analysis, models, transforms
from jaxcifar.state import init_variables

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@pytest.fixture(scope="module")
def setup():
    model = models.get_model("resnet18", width=4)
    variables = init_variables(model, jax.random.PRNGKey(0))
    images = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (7, 32, 32, 3), 0, 256), np.uint8)
    return model, variables, images


def test_predict_shapes_and_padding_do_not_change_results(setup):
    model, variables, images = setup
    probs, preds = analysis.predict(model, variables, images, MEAN, STD, batch_size=3)  # 3 batches, 2 padded rows
    chex.assert_shape(probs, (7, 10))
    chex.assert_shape(preds, (7,))
    assert probs.dtype == np.float32 and preds.dtype == np.int32
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(preds, probs.argmax(axis=-1))

    whole, whole_preds = analysis.predict(model, variables, images, MEAN, STD, batch_size=64)  # one batch of 7
    np.testing.assert_allclose(probs, whole, atol=1e-6)
    np.testing.assert_array_equal(preds, whole_preds)

    logits = jax.jit(lambda v, x: model.apply(v, transforms.normalize(x, MEAN, STD), train=False))(variables, images)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits), atol=1e-6)


def test_predict_rejects_non_uint8_images(setup):
    model, variables, images = setup
    with pytest.raises(ValueError, match="uint8"):
        analysis.predict(model, variables, images.astype(np.float32), MEAN, STD)


def _toy_split():
    """6 examples of 3 classes; mistakes at 1 (p=.7), 2 (p=.5), 4 (p=.7, ties with 1), 5 (p=.9)."""
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.array(
        [
            [0.8, 0.1, 0.1],  # right
            [0.7, 0.2, 0.1],  # 1 -> 0, 0.7
            [0.2, 0.5, 0.3],  # 2 -> 1, 0.5
            [0.6, 0.3, 0.1],  # right
            [0.1, 0.2, 0.7],  # 1 -> 2, 0.7
            [0.9, 0.05, 0.05],  # 2 -> 0, 0.9
        ],
        np.float32,
    )
    images = np.arange(6, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    return images, labels, probs


def test_misclassified_most_confident_first_ties_by_index():
    images, labels, probs = _toy_split()
    wrong = analysis.misclassified(images, labels, probs)
    np.testing.assert_array_equal(wrong.indices, [5, 1, 4, 2])
    np.testing.assert_array_equal(wrong.true, [2, 1, 1, 2])
    np.testing.assert_array_equal(wrong.pred, [0, 0, 2, 1])
    np.testing.assert_allclose(wrong.confidence, [0.9, 0.7, 0.7, 0.5])
    np.testing.assert_array_equal(wrong.images, images[[5, 1, 4, 2]])
    assert wrong.images.dtype == np.uint8 and len(wrong) == 4

    top = analysis.misclassified(images, labels, probs, n=2)
    np.testing.assert_array_equal(top.indices, [5, 1])
    assert len(analysis.misclassified(images, labels, probs, n=10)) == 4
    assert len(analysis.misclassified(images, np.argmax(probs, -1), probs)) == 0


def test_confusion_matrix_and_per_class_accuracy_agree():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=500)
    preds = np.where(rng.uniform(size=500) < 0.6, labels, rng.integers(0, 10, size=500))
    cm = analysis.confusion_matrix(labels, preds, 10)
    assert cm.dtype == np.int64 and cm.shape == (10, 10)
    assert cm.sum() == 500
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(labels, minlength=10))
    np.testing.assert_array_equal(cm.sum(axis=0), np.bincount(preds, minlength=10))
    assert cm[3, 7] == np.sum((labels == 3) & (preds == 7))
    assert np.trace(cm) == np.sum(labels == preds)
    accuracy = analysis.per_class_accuracy(labels, preds, 10)
    np.testing.assert_allclose(accuracy, np.diag(cm) / cm.sum(axis=1))
    np.testing.assert_allclose(accuracy[4], np.mean(preds[labels == 4] == 4))


def test_per_class_accuracy_marks_absent_classes_and_range_is_checked():
    accuracy = analysis.per_class_accuracy(jnp.array([0, 0, 2]), jnp.array([0, 1, 2]), 3)
    np.testing.assert_allclose(accuracy, [0.5, np.nan, 1.0])
    with pytest.raises(ValueError, match=r"preds must be in \[0, 3\)"):
        analysis.confusion_matrix(np.array([0, 1]), np.array([0, 3]), 3)
