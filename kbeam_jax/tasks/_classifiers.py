"""Classifiers and training helpers shared by the bilevel data tasks (denoising, poisoning).

Parameters are plain dicts of arrays, so the bilevel solvers differentiate them as they
are: ``softmax_regression`` (multinomial logistic regression on flattened pixels) and
``small_cnn`` (two strided 3×3 convolutions and a linear read-out). Each model is an
``(init, apply)`` pair; ``fit`` trains one on (weighted) data by full-batch Adam inside
``lax.scan``, for the retraining and reference classifiers the benchmarks report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
NUM_PIXELS = 28 * 28


class Classifier(NamedTuple):
  """``params = init(key)``, ``logits = apply(params, x)`` with ``x`` of shape (N, 784)."""

  name: str
  init: Callable[[jax.Array], dict[str, jax.Array]]
  apply: Callable[[dict[str, jax.Array], jax.Array], jax.Array]


def flatten_images(images: Any) -> np.ndarray:
  """uint8 images ``(N, 28, 28)`` (or already-flat ``(N, 784)``) to float32 ``(N, 784)`` in [0, 1].

  Examples:
    >>> import numpy as np
    >>> from kbeam_jax.tasks import denoising
    >>> x = denoising.flatten_images(np.full((2, 28, 28), 255, np.uint8))
    >>> x.shape, x.dtype, float(x.max())
    ((2, 784), dtype('float32'), 1.0)
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(
      f"images must be uint8 pixels 0..255 (as load_mnist returns them), got {images.dtype}."
    )
  if images.ndim == 3 and images.shape[1:] == IMAGE_SHAPE:
    images = images.reshape(images.shape[0], NUM_PIXELS)
  if images.ndim != 2 or images.shape[1] != NUM_PIXELS:
    raise ValueError(f"images must have shape (N, 28, 28) or (N, 784), got {images.shape}.")
  return images.astype(np.float32) / 255.0


def check_labels(labels: Any, n: int, what: str = "labels") -> np.ndarray:
  """``labels`` as int32 of shape ``(n,)`` with values in 0..9, or a clear error."""
  labels = np.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"{what} must have shape ({n},) to match the images, got {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"{what} must be integers 0..9, got dtype {labels.dtype}.")
  if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise ValueError(f"{what} must lie in 0..9, got values {labels.min()}..{labels.max()}.")
  return labels.astype(np.int32)


def split_pool(
  images: Any, labels: Any, num_train: int, num_val: int, rng: np.random.Generator
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Disjoint ``(x, y)`` training and validation sets drawn from a pool of digits.

  ``images`` as ``flatten_images`` takes them, ``labels`` 0..9; the draw is one
  ``rng.permutation`` of the pool.
  """
  x_pool = flatten_images(images)
  y_pool = check_labels(labels, x_pool.shape[0], "train_labels")
  if num_train < 1 or num_val < 1:
    raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}.")
  if num_train + num_val > x_pool.shape[0]:
    raise ValueError(
      f"num_train + num_val = {num_train + num_val} exceeds the {x_pool.shape[0]} images given."
    )
  order = rng.permutation(x_pool.shape[0])
  train, val = order[:num_train], order[num_train : num_train + num_val]
  return (x_pool[train], y_pool[train]), (x_pool[val], y_pool[val])


def softmax_regression(dtype: Any = jnp.float32) -> Classifier:
  """Multinomial logistic regression ``logits = x W + b``, parameters initialised to zero.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax.tasks import denoising
    >>> model = denoising.softmax_regression()
    >>> params = model.init(jax.random.key(0))
    >>> params["W"].shape, model.apply(params, jnp.ones((3, 784))).shape
    ((784, 10), (3, 10))
  """

  def init(key):
    del key
    return {
      "W": jnp.zeros((NUM_PIXELS, NUM_CLASSES), dtype),
      "b": jnp.zeros((NUM_CLASSES,), dtype),
    }

  return Classifier("softmax_regression", init, _linear_apply)


def small_cnn(channels: tuple[int, int] = (8, 16), dtype: Any = jnp.float32) -> Classifier:
  """Two 3×3 stride-2 convolutions with ReLU (28→14→7) and a linear read-out.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax.tasks import denoising
    >>> model = denoising.small_cnn()
    >>> params = model.init(jax.random.key(0))
    >>> model.apply(params, jnp.ones((2, 784))).shape
    (2, 10)
  """
  c1, c2 = channels

  def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    he = lambda k, shape, fan_in: jax.random.normal(k, shape, dtype) * np.sqrt(2.0 / fan_in)
    return {
      "conv1": he(k1, (3, 3, 1, c1), 9),
      "bias1": jnp.zeros((c1,), dtype),
      "conv2": he(k2, (3, 3, c1, c2), 9 * c1),
      "bias2": jnp.zeros((c2,), dtype),
      "W": he(k3, (7 * 7 * c2, NUM_CLASSES), 7 * 7 * c2) / np.sqrt(2.0),
      "b": jnp.zeros((NUM_CLASSES,), dtype),
    }

  return Classifier("small_cnn", init, _cnn_apply)


def _linear_apply(params, x):
  return x @ params["W"] + params["b"][None, :]


def _conv(x, kernel, bias):
  """3×3 stride-2 convolution (zero padding 1) as nine strided slices and one contraction.

  Written with slices instead of ``lax.conv_general_dilated``: XLA's CPU convolution
  (and its gradients) inside ``lax.scan`` was an order of magnitude slower here.
  """
  h, w = x.shape[1], x.shape[2]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.stack(
    [padded[:, i : i + h - 1 : 2, j : j + w - 1 : 2, :] for i in range(3) for j in range(3)],
    axis=3,
  )  # (N, H/2, W/2, 9, C)
  y = jnp.einsum("nhwkc,kco->nhwo", patches, kernel.reshape(9, *kernel.shape[2:]))
  return jax.nn.relu(y + bias[None, None, None, :])


def _cnn_apply(params, x):
  h = x.reshape(x.shape[0], *IMAGE_SHAPE, 1)
  h = _conv(h, params["conv1"], params["bias1"])
  h = _conv(h, params["conv2"], params["bias2"])
  return h.reshape(h.shape[0], -1) @ params["W"] + params["b"][None, :]


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None):
  """Mean softmax cross-entropy, or ``Σ w_i ℓ_i / Σ w_i`` with per-sample ``weights``."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if weights is None:
    return jnp.mean(losses)
  return jnp.sum(weights * losses) / jnp.sum(weights)


def l2_penalty(params: dict[str, jax.Array]) -> jax.Array:
  """``Σ |W|²`` over the weight matrices and kernels (biases are not penalised)."""
  return sum(jnp.sum(p**2) for k, p in params.items() if not k.startswith(("b", "bias")))


def accuracy(model: Classifier, params, x, labels) -> float:
  """Fraction of ``x`` that ``model`` classifies as ``labels``."""
  return float(jnp.mean(jnp.argmax(model.apply(params, x), axis=-1) == labels))


def fit(
  model: Classifier,
  x: Any,
  labels: Any,
  *,
  weights: Any = None,
  l2: float = 0.0,
  num_steps: int = 500,
  lr: float = 0.01,
  key: jax.Array | None = None,
):
  """Trains ``model`` on ``Σ w_i ℓ_i / Σ w_i + l2·|W|²`` by full-batch Adam; returns params.

  ``weights`` (default all ones) selects or weights samples without changing shapes, so
  one compiled program serves every subset of the same arrays.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax.tasks import denoising
    >>> x = jax.random.uniform(jax.random.key(0), (40, 784))
    >>> y = jnp.arange(40) % 10
    >>> model = denoising.softmax_regression()
    >>> params = denoising.fit(model, x, y, num_steps=200, lr=0.05)
    >>> denoising.accuracy(model, params, x, y)
    1.0
  """
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be an int >= 1, got num_steps={num_steps!r}.")
  x = jnp.asarray(x)
  labels = jnp.asarray(labels)
  weights = jnp.ones(x.shape[0], x.dtype) if weights is None else jnp.asarray(weights, x.dtype)
  params = model.init(jax.random.key(0) if key is None else key)
  return _fit(model.apply, params, x, labels, weights, l2, num_steps, lr)


def _fit(apply, params, x, labels, weights, l2, num_steps, lr):
  return _fit_jit(apply, num_steps, lr)(params, x, labels, weights, l2)


_FIT_CACHE: dict[Any, Callable[..., Any]] = {}


def _fit_jit(apply, num_steps, lr):
  """One jitted training program per (model, steps, learning rate)."""
  cache_key = (apply, num_steps, lr)
  if cache_key not in _FIT_CACHE:
    opt = optax.adam(lr)

    def run(params, x, labels, weights, l2):
      loss = lambda p: cross_entropy(apply(p, x), labels, weights) + l2 * l2_penalty(p)

      def body(carry, _):
        p, s = carry
        updates, s = opt.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, updates), s), None

      return jax.lax.scan(body, (params, opt.init(params)), length=num_steps)[0][0]

    _FIT_CACHE[cache_key] = jax.jit(run)
  return _FIT_CACHE[cache_key]
