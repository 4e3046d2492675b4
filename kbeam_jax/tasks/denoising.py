r"""Data denoising by importance learning (Mehra & Hamm, ACML 2021, Section 5).

A training set with a fraction of corrupted labels and a small clean validation set.
Each training point gets a weight ``w_i = ½(tanh(a_i) + 1)``; the upper variable is ``a``:

    min_a  f(a, v*) = mean CE of the classifier v* on the validation set
    s.t.   v* = argmin_v g(a, v) = Σ w_i ℓ_i(v) / Σ w_i  (+ l2·|W|²)

Learned weights near 0 flag corrupted points. The evaluation retrains a classifier on the
points with ``w > 0.9`` plus the validation set and measures test accuracy, beside a
classifier trained on everything (noisy, the lower bound) and on the clean points only
(the oracle, the upper bound); precision and recall say how well ``w <= 0.9`` finds the
corrupted points.

Examples:
  >>> import numpy as np, jax.numpy as jnp
  >>> from kbeam_jax.tasks import denoising
  >>> rng = np.random.default_rng(0)
  >>> images = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
  >>> labels = np.arange(60) % 10
  >>> data = denoising.make_data(images, labels, images[:20], labels[:20], num_train=30,
  ...                            num_val=20, noise=0.5, seed=0)
  >>> data.x_train.shape, int(data.corrupted.sum()), bool(np.all(
  ...   (data.y_train != data.y_clean) == data.corrupted))
  ((30, 784), 15, True)
  >>> model = denoising.softmax_regression()
  >>> f, g = denoising.objectives(model)
  >>> a, v = jnp.zeros(30), model.init(None)
  >>> round(float(f(a, v, *data.bilevel_args())), 4)  # log 10: uniform predictions
  2.3026
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kbeam_jax.tasks._classifiers import NUM_CLASSES, check_labels, l2_penalty, split_pool
from kbeam_jax.tasks._classifiers import Classifier as Classifier
from kbeam_jax.tasks._classifiers import accuracy as accuracy
from kbeam_jax.tasks._classifiers import cross_entropy as cross_entropy
from kbeam_jax.tasks._classifiers import fit as fit
from kbeam_jax.tasks._classifiers import flatten_images as flatten_images
from kbeam_jax.tasks._classifiers import small_cnn as small_cnn
from kbeam_jax.tasks._classifiers import softmax_regression as softmax_regression

THRESHOLD = 0.9  # points with w > THRESHOLD are kept when retraining


class DenoisingData(NamedTuple):
  """Flattened float32 images in [0, 1] and int32 labels; ``y_train`` is the noisy one."""

  x_train: np.ndarray
  y_train: np.ndarray
  y_clean: np.ndarray
  corrupted: np.ndarray  # bool, y_train != y_clean
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  def bilevel_args(self) -> tuple[jax.Array, ...]:
    """``(x_train, y_train, x_val, y_val)``, the extra arguments of ``f`` and ``g``."""
    return tuple(jnp.asarray(a) for a in (self.x_train, self.y_train, self.x_val, self.y_val))


def corrupt_labels(labels: Any, fraction: float, rng: np.random.Generator):
  """Gives ``round(fraction·n)`` randomly chosen points a uniformly random *different* label.

  Returns:
    ``(noisy_labels, corrupted)``, the second a boolean mask.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"the noise fraction must lie in [0, 1], got {fraction}.")
  labels = np.asarray(labels)
  n = labels.shape[0]
  corrupted = np.zeros(n, bool)
  corrupted[rng.choice(n, size=round(fraction * n), replace=False)] = True
  shift = rng.integers(1, NUM_CLASSES, size=n)
  noisy = np.where(corrupted, (labels + shift) % NUM_CLASSES, labels).astype(np.int32)
  return noisy, corrupted


def make_data(
  train_images: Any,
  train_labels: Any,
  test_images: Any,
  test_labels: Any,
  *,
  num_train: int,
  num_val: int,
  noise: float,
  seed: int,
  num_test: int | None = None,
) -> DenoisingData:
  """Draws disjoint training and validation sets and corrupts ``noise`` of the training labels.

  Args:
    train_images, train_labels: the pool (uint8 ``(N, 28, 28)``, labels 0..9), e.g.
      ``kbeam_jax.data.load_mnist("train")``.
    test_images, test_labels: the test set (all of it unless ``num_test``).
    num_train, num_val: sizes drawn without overlap from the pool.
    noise: fraction of training labels replaced by a random different label.
    seed: seeds the draw and the corruption (same seed, same data).
    num_test: use only the first ``num_test`` test images.

  Returns:
    ``DenoisingData``.
  """
  x_test = flatten_images(test_images)
  y_test = check_labels(test_labels, x_test.shape[0], "test_labels")
  if num_test is not None:
    x_test, y_test = x_test[:num_test], y_test[:num_test]
  rng = np.random.default_rng(seed)
  (x_train, y_clean), (x_val, y_val) = split_pool(
    train_images, train_labels, num_train, num_val, rng
  )
  noisy, corrupted = corrupt_labels(y_clean, noise, rng)
  return DenoisingData(x_train, noisy, y_clean, corrupted, x_val, y_val, x_test, y_test)


def importance_weights(a: jax.Array) -> jax.Array:
  """``w = ½(tanh(a) + 1)`` in (0, 1); ``a = 0`` gives 0.5."""
  return 0.5 * (jnp.tanh(a) + 1.0)


def objectives(model: Classifier, *, l2: float = 0.0):
  """``(f, g)`` of the importance-learning problem for ``model``.

  ``f(a, v, x_train, y_train, x_val, y_val)`` is the validation cross-entropy;
  ``g(...)`` the weighted training cross-entropy ``Σ w_i ℓ_i / Σ w_i`` plus ``l2·|W|²``
  (0 in the paper; a small value makes the lower problem strongly convex).
  """
  if l2 < 0:
    raise ValueError(f"l2 must be >= 0, got {l2}.")

  def f(a, v, x_train, y_train, x_val, y_val):
    del a, x_train, y_train
    return cross_entropy(model.apply(v, x_val), y_val)

  def g(a, v, x_train, y_train, x_val, y_val):
    del x_val, y_val
    if a.shape != y_train.shape:
      raise ValueError(f"a must have one entry per training point {y_train.shape}, got {a.shape}.")
    loss = cross_entropy(model.apply(v, x_train), y_train, importance_weights(a))
    return loss + l2 * l2_penalty(v)

  return f, g


def detection(weights: Any, corrupted: Any, threshold: float = THRESHOLD) -> dict[str, float]:
  """Precision and recall of ``w <= threshold`` as a detector of the corrupted points.

  Examples:
    >>> import numpy as np
    >>> from kbeam_jax.tasks import denoising
    >>> denoising.detection(np.array([0.1, 0.95, 0.2, 0.99]), np.array([1, 0, 0, 1], bool))
    {'precision': 0.5, 'recall': 0.5, 'kept': 2}
  """
  weights, corrupted = np.asarray(weights), np.asarray(corrupted, bool)
  if weights.shape != corrupted.shape:
    raise ValueError(f"weights {weights.shape} and corrupted {corrupted.shape} differ in shape.")
  flagged = weights <= threshold
  hits = int(np.sum(flagged & corrupted))
  return {
    "precision": hits / max(int(flagged.sum()), 1),
    "recall": hits / max(int(corrupted.sum()), 1),
    "kept": int(np.sum(~flagged)),
  }


def retrained_accuracy(
  model: Classifier, data: DenoisingData, keep: Any, **fit_options: Any
) -> float:
  """Test accuracy of ``model`` trained on the kept training points plus the validation set.

  ``keep`` is a boolean mask over the training points (e.g. ``w > 0.9``); ``fit_options``
  go to ``fit`` (``num_steps``, ``lr``, ``l2``, ``key``).
  """
  keep = np.asarray(keep, bool)
  if keep.shape != data.y_train.shape:
    raise ValueError(f"keep must have shape {data.y_train.shape}, got {keep.shape}.")
  x = np.concatenate([data.x_train, data.x_val])
  y = np.concatenate([data.y_train, data.y_val])
  weights = np.concatenate([keep, np.ones(data.y_val.shape, bool)]).astype(np.float32)
  params = fit(model, x, y, weights=weights, **fit_options)
  return accuracy(model, params, jnp.asarray(data.x_test), jnp.asarray(data.y_test))


def three_level_objectives(
  model: Classifier, *, method: Any, inner_steps: int, inner_lr: float, ridge: float = 1e-3
):
  r"""``(f, g)`` of a three-level program: a regularization strength over importance weights
  over the classifier.

  Level 3 fits the classifier ``v*(a, λ) = argmin_v Σ w_i(a) ℓ_i(v) / Σ w_i + e^λ |W|²``
  (``bilevel.argmin`` from ``v0``, ``inner_steps`` descent steps, differentiated by
  ``method``); level 2 picks the weights ``a*(λ) = argmin_a CE_val(v*(a, λ)) + ½ridge|a|²``
  (the ridge makes its optimum unique, so that level 1 can differentiate through it);
  level 1 picks ``λ`` by the loss on a second validation set, ``CE_val2(v*(a*(λ), λ))``.
  ``f(λ, a, *args)`` and ``g(λ, a, *args)`` are level 1's and level 2's objectives, for
  ``bilevel.solver`` over ``λ`` with ``a`` as its lower variable;
  ``args = (x_train, y_train, x_val, y_val, x_val2, y_val2, v0)``.
  """
  from kbeam_jax import bilevel

  def lower(a, v, log_l2, x_train, y_train):
    loss = cross_entropy(model.apply(v, x_train), y_train, importance_weights(a))
    return loss + jnp.exp(log_l2) * l2_penalty(v)

  def classifier(log_l2, a, x_train, y_train, v0):
    return bilevel.argmin(lower, a, v0, log_l2, x_train, y_train, method=method,
                          inner_steps=inner_steps, inner_lr=inner_lr)  # fmt: skip

  def g(log_l2, a, x_train, y_train, x_val, y_val, x_val2, y_val2, v0):
    del x_val2, y_val2
    v = classifier(log_l2, a, x_train, y_train, v0)
    return cross_entropy(model.apply(v, x_val), y_val) + 0.5 * ridge * jnp.sum(a**2)

  def f(log_l2, a, x_train, y_train, x_val, y_val, x_val2, y_val2, v0):
    del x_val, y_val
    v = classifier(log_l2, a, x_train, y_train, v0)
    return cross_entropy(model.apply(v, x_val2), y_val2)

  return f, g
