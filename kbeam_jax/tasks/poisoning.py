r"""Training-data poisoning as a bilevel problem (Mehra & Hamm, ACML 2021, Section 5).

The attacker adds ``n`` poison images ``X_p`` (kept in [0, 1], labels fixed) to a clean
training set; the learner fits a linear softmax classifier with an L2 term:

    max_{X_p ∈ [0,1]}  validation loss of v*       (untargeted: f = -CE(val))
    s.t.  v* = argmin_v CE(train ∪ poisons; v) + l2·|W|²,   l2 = 0.005

In the targeted variant the poisons come from a ``source`` class relabelled as ``target``
and the attacker minimizes the loss of labelling the source-class validation images as
``target``; success is the target misclassification rate (the fraction of source-class
test images classified as ``target``). The poisons start as training images with wrong
labels, which is itself the random-label-flip attack of the same size.

Examples:
  >>> import numpy as np, jax.numpy as jnp
  >>> from kbeam_jax.tasks import poisoning
  >>> rng = np.random.default_rng(0)
  >>> images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
  >>> labels = np.arange(50) % 10
  >>> data = poisoning.make_data(images, labels, images, labels, num_train=20, num_val=20,
  ...                            num_test=30, seed=0)
  >>> x_p, y_p = poisoning.init_poisons(data, 4, seed=1)
  >>> x_p.shape, y_p.shape
  ((4, 784), (4,))
  >>> model = poisoning.softmax_regression()
  >>> f, g = poisoning.objectives(model)
  >>> args = poisoning.bilevel_args(data, y_p)
  >>> v = model.init(None)
  >>> round(float(f(jnp.asarray(x_p), v, *args)), 4)  # -log 10: uniform predictions
  -2.3026
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kbeam_jax.tasks._classifiers import (
  NUM_CLASSES,
  NUM_PIXELS,
  check_labels,
  l2_penalty,
  split_pool,
)
from kbeam_jax.tasks._classifiers import Classifier as Classifier
from kbeam_jax.tasks._classifiers import accuracy as accuracy
from kbeam_jax.tasks._classifiers import cross_entropy as cross_entropy
from kbeam_jax.tasks._classifiers import fit as fit
from kbeam_jax.tasks._classifiers import flatten_images as flatten_images
from kbeam_jax.tasks._classifiers import softmax_regression as softmax_regression

L2 = 0.005  # the paper's weight of |W|² in the lower problem


class PoisoningData(NamedTuple):
  """Flattened float32 images in [0, 1] and int32 labels of the three disjoint sets."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def make_data(
  train_images: Any,
  train_labels: Any,
  test_images: Any,
  test_labels: Any,
  *,
  num_train: int = 1000,
  num_val: int = 1000,
  num_test: int = 8000,
  seed: int,
) -> PoisoningData:
  """Disjoint training and validation sets from the training pool, a random test subset.

  Args:
    train_images, train_labels: the pool, e.g. ``kbeam_jax.data.load_mnist("train")``.
    test_images, test_labels: the test pool (``num_test`` drawn from it).
    num_train, num_val, num_test: set sizes (the paper: 1,000 / 1,000 / 8,000).
    seed: seeds every draw.

  Returns:
    ``PoisoningData``.
  """
  x_tpool = flatten_images(test_images)
  y_tpool = check_labels(test_labels, x_tpool.shape[0], "test_labels")
  rng = np.random.default_rng(seed)
  train, val = split_pool(train_images, train_labels, num_train, num_val, rng)
  if num_test < 1:
    raise ValueError(f"num_test must be >= 1, got {num_test}.")
  if num_test > x_tpool.shape[0]:
    raise ValueError(f"num_test = {num_test} exceeds the {x_tpool.shape[0]} test images given.")
  test = rng.permutation(x_tpool.shape[0])[:num_test]
  return PoisoningData(*train, *val, x_tpool[test], y_tpool[test])


def init_poisons(
  data: PoisoningData,
  num_poison: int,
  *,
  seed: int,
  source: int | None = None,
  target: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Initial poisons: copies of training images with wrong labels.

  Untargeted (``source`` and ``target`` None): ``num_poison`` random training images, each
  with a uniformly random different label; this is also the random-label-flip attack.
  Targeted: ``num_poison`` training images of class ``source``, labelled ``target``.

  Returns:
    ``(x_poison (num_poison, 784) float32, y_poison (num_poison,) int32)``.
  """
  if num_poison < 1:
    raise ValueError(f"num_poison must be >= 1, got {num_poison}.")
  rng = np.random.default_rng(seed)
  if (source is None) != (target is None):
    raise ValueError("give both source and target (targeted attack) or neither (untargeted).")
  if source is None:
    if num_poison > data.y_train.shape[0]:
      raise ValueError(f"num_poison = {num_poison} exceeds the {data.y_train.shape[0]} images.")
    idx = rng.choice(data.y_train.shape[0], size=num_poison, replace=False)
    shift = rng.integers(1, NUM_CLASSES, size=num_poison)
    return data.x_train[idx].copy(), ((data.y_train[idx] + shift) % NUM_CLASSES).astype(np.int32)
  for name, c in (("source", source), ("target", target)):
    if not 0 <= c < NUM_CLASSES:
      raise ValueError(f"{name} must be a class 0..9, got {c}.")
  if source == target:
    raise ValueError(f"source and target must differ, got {source} for both.")
  candidates = np.flatnonzero(data.y_train == source)
  if num_poison > candidates.size:
    raise ValueError(
      f"num_poison = {num_poison} exceeds the {candidates.size} training images of class {source}."
    )
  idx = rng.choice(candidates, size=num_poison, replace=False)
  return data.x_train[idx].copy(), np.full(num_poison, target, np.int32)


def project_images(x: jax.Array) -> jax.Array:
  """The poisons' constraint: pixels in [0, 1] (``project_u`` of the bilevel solver).

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.tasks import poisoning
    >>> poisoning.project_images(jnp.array([-0.5, 0.3, 1.2]))
    Array([0. , 0.3, 1. ], dtype=float32)
  """
  return jnp.clip(x, 0.0, 1.0).astype(x.dtype)


def bilevel_args(
  data: PoisoningData, y_poison: Any, *, source: int | None = None, target: int | None = None
) -> tuple[jax.Array, ...]:
  """``(x_train, y_train, y_poison, x_val, y_val)``: the extra arguments of ``f`` and ``g``.

  For the targeted attack the validation part is the ``source``-class images labelled
  ``target``.
  """
  x_val, y_val = data.x_val, data.y_val
  if (source is None) != (target is None):
    raise ValueError("give both source and target (targeted attack) or neither (untargeted).")
  if source is not None:
    x_val = x_val[y_val == source]
    y_val = np.full(x_val.shape[0], target, np.int32)
  if np.ndim(y_poison) != 1:
    raise ValueError(f"y_poison must be a 1-D array of labels, got shape {np.shape(y_poison)}.")
  y_poison = check_labels(y_poison, len(y_poison), "y_poison")
  return tuple(jnp.asarray(a) for a in (data.x_train, data.y_train, y_poison, x_val, y_val))


def objectives(model: Classifier, *, l2: float = L2, targeted: bool = False):
  """``(f, g)`` of the poisoning problem; the upper variable is ``x_poison (n, 784)``.

  ``g(x_poison, v, x_train, y_train, y_poison, x_val, y_val)`` is the mean cross-entropy
  over the training and poison points plus ``l2·|W|²``; ``f`` is minus the validation
  cross-entropy (untargeted) or the cross-entropy of the validation labels given
  (targeted: the source-class images labelled ``target``, from ``bilevel_args``).
  """
  if l2 < 0:
    raise ValueError(f"l2 must be >= 0, got {l2}.")
  sign = 1.0 if targeted else -1.0

  def f(x_poison, v, x_train, y_train, y_poison, x_val, y_val):
    del x_poison, x_train, y_train, y_poison
    return sign * cross_entropy(model.apply(v, x_val), y_val)

  def g(x_poison, v, x_train, y_train, y_poison, x_val, y_val):
    del x_val, y_val
    if x_poison.ndim != 2 or x_poison.shape != (y_poison.shape[0], NUM_PIXELS):
      raise ValueError(
        f"x_poison must have shape ({y_poison.shape[0]}, {NUM_PIXELS}) to match y_poison, "
        f"got {x_poison.shape}."
      )
    x = jnp.concatenate([x_train, x_poison.astype(x_train.dtype)])
    y = jnp.concatenate([y_train, y_poison])
    return cross_entropy(model.apply(v, x), y) + l2 * l2_penalty(v)

  return f, g


def train_poisoned(
  model: Classifier,
  data: PoisoningData,
  x_poison: Any = None,
  y_poison: Any = None,
  *,
  l2: float = L2,
  **fit_options: Any,
):
  """The learner's classifier on ``train ∪ poisons`` (no poisons: the clean classifier)."""
  x, y = data.x_train, data.y_train
  if x_poison is not None:
    x_poison = np.asarray(x_poison, np.float32)
    y_poison = check_labels(y_poison, x_poison.shape[0], "y_poison")
    if x_poison.min() < 0 or x_poison.max() > 1:
      raise ValueError("poison images must lie in [0, 1].")
    x, y = np.concatenate([x, x_poison]), np.concatenate([y, y_poison])
  return fit(model, x, y, l2=l2, **fit_options)


def target_misclassification(
  model: Classifier, params, data: PoisoningData, source: int, target: int
) -> float:
  """Fraction of the ``source``-class test images that ``params`` classifies as ``target``.

  Examples:
    >>> import numpy as np, jax.numpy as jnp
    >>> from kbeam_jax.tasks import poisoning
    >>> model = poisoning.softmax_regression()
    >>> params = {"W": jnp.zeros((784, 10)), "b": jnp.eye(10)[7]}  # always predicts 7
    >>> x = np.zeros((4, 784), np.float32); y = np.array([1, 1, 2, 3], np.int32)
    >>> data = poisoning.PoisoningData(x, y, x, y, x, y)
    >>> poisoning.target_misclassification(model, params, data, source=1, target=7)
    1.0
  """
  mask = data.y_test == source
  if not mask.any():
    raise ValueError(f"the test set has no images of class {source}.")
  predicted = jnp.argmax(model.apply(params, jnp.asarray(data.x_test[mask])), axis=-1)
  return float(jnp.mean(predicted == target))
