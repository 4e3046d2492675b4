"""Domain adaptation as a K-beam game (DANN, Ganin et al. 2015; Hamm & Noh, ICML 2018).

A feature extractor and a label classifier (the leader) against K domain classifiers
(the beams):

``min_{F, C} max_D  CE(C(F(x_s)), y_s) - ½ CE(D(F(x_s)), source) - ½ CE(D(F(x_t)), target)``.

The domain classifier maximizes the value by classifying domains well; the extractor
minimizes it by making source and target features indistinguishable while keeping the
labels predictable. Models (Ganin et al.'s MNIST architecture): extractor conv 5×5×32 →
ReLU → max-pool 2 → conv 5×5×48 → ReLU → max-pool 2 → flatten (768 features on 28×28);
label classifier 100 → 100 → 10; domain classifier 100 → 2, all ReLU.

References: Ganin & Lempitsky, Unsupervised Domain Adaptation by Backpropagation, ICML
2015; Hamm & Noh, K-Beam Minimax, ICML 2018.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kbeam_jax import nn as kbeam_nn
from kbeam_jax.tasks._classifiers import cross_entropy as cross_entropy

FEATURES = 4 * 4 * 48


class FeatureExtractor(nnx.Module):
  """``(N, 28, 28, C) → (N, 768)``: two valid 5×5 convolutions with ReLU and 2×2 max-pool."""

  def __init__(self, rngs: nnx.Rngs, channels: int = 3):
    # nn.Conv, not nnx.Conv: same parameters, 25x faster inside lax.scan on the CPU.
    self.conv1 = kbeam_nn.Conv(channels, 32, (5, 5), rngs=rngs)
    self.conv2 = kbeam_nn.Conv(32, 48, (5, 5), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = kbeam_nn.max_pool2(jax.nn.relu(self.conv1(x)))
    h = kbeam_nn.max_pool2(jax.nn.relu(self.conv2(h)))
    return h.reshape(h.shape[0], -1)


class LabelClassifier(nnx.Module):
  """``768 → 100 → 100 → 10`` with ReLU."""

  def __init__(self, rngs: nnx.Rngs, dim_in: int = FEATURES, num_classes: int = 10):
    self.l1 = nnx.Linear(dim_in, 100, rngs=rngs)
    self.l2 = nnx.Linear(100, 100, rngs=rngs)
    self.out = nnx.Linear(100, num_classes, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.out(jax.nn.relu(self.l2(jax.nn.relu(self.l1(h)))))


class DomainClassifier(nnx.Module):
  """``768 → 100 → 2`` with ReLU: source (0) or target (1)."""

  def __init__(self, rngs: nnx.Rngs, dim_in: int = FEATURES):
    self.l1 = nnx.Linear(dim_in, 100, rngs=rngs)
    self.out = nnx.Linear(100, 2, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.out(jax.nn.relu(self.l1(h)))


def graphdefs(channels: int = 3) -> tuple[nnx.GraphDef, nnx.GraphDef, nnx.GraphDef]:
  """Graph definitions of the extractor, label classifier and domain classifier."""
  shape = lambda make: nnx.split(nnx.eval_shape(make), nnx.Param)[0]
  return (
    shape(lambda: FeatureExtractor(nnx.Rngs(0), channels)),
    shape(lambda: LabelClassifier(nnx.Rngs(0))),
    shape(lambda: DomainClassifier(nnx.Rngs(0))),
  )


def init_leader(key: jax.Array, channels: int = 3) -> dict[str, Any]:
  """``{"features": ..., "labels": ...}`` parameters of the extractor and label classifier."""
  k1, k2 = jax.random.split(key)
  _, feats = nnx.split(FeatureExtractor(nnx.Rngs(k1), channels), nnx.Param)
  _, labels = nnx.split(LabelClassifier(nnx.Rngs(k2)), nnx.Param)
  return {"features": nnx.as_pure(feats), "labels": nnx.as_pure(labels)}


def objective(channels: int = 3) -> Callable[..., jax.Array]:
  """``f(u, v, x_s, y_s, x_t)``: the DANN game value (see the module docstring).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx

  from kbeam_jax import nn as kbeam_nn
      >>> from kbeam_jax.tasks import domain_adaptation as da
      >>> u = da.init_leader(jax.random.key(0))
      >>> v = nnx.as_pure(nnx.split(da.DomainClassifier(nnx.Rngs(1)), nnx.Param)[1])
      >>> x = jnp.zeros((4, 28, 28, 3))
      >>> da.objective()(u, v, x, jnp.arange(4), x).shape
      ()
  """
  fdef, cdef, ddef = graphdefs(channels)

  def f(u, v, x_s, y_s, x_t):
    extract = nnx.merge(fdef, u["features"])
    h_s, h_t = extract(x_s), extract(x_t)
    label_loss = cross_entropy(nnx.merge(cdef, u["labels"])(h_s), y_s)
    D = nnx.merge(ddef, v)
    domain_s = cross_entropy(D(h_s), jnp.zeros(h_s.shape[0], jnp.int32))
    domain_t = cross_entropy(D(h_t), jnp.ones(h_t.shape[0], jnp.int32))
    return label_loss - 0.5 * domain_s - 0.5 * domain_t

  return f


def classification_loss(channels: int = 3) -> Callable[..., jax.Array]:
  """``loss(u, x, y)``: label cross-entropy of the extractor + label classifier alone
  (the source-only and target-supervised bounds)."""
  fdef, cdef, _ = graphdefs(channels)
  return lambda u, x, y: cross_entropy(
    nnx.merge(cdef, u["labels"])(nnx.merge(fdef, u["features"])(x)), y
  )


@functools.cache
def _predictor(channels: int) -> Callable[..., jax.Array]:
  """One jitted label predictor per channel count (compiled once, not per evaluation)."""
  fdef, cdef, _ = graphdefs(channels)
  return jax.jit(
    lambda u, x: jnp.argmax(nnx.merge(cdef, u["labels"])(nnx.merge(fdef, u["features"])(x)), -1)
  )


def accuracy(u: Any, x: np.ndarray, y: np.ndarray, batch: int = 1000, channels: int = 3) -> float:
  """Label accuracy of ``u`` on ``(x, y)``, evaluated ``batch`` images at a time."""
  predict = _predictor(channels)
  correct = 0
  for i in range(0, len(x), batch):
    correct += int(
      jnp.sum(predict(u, jnp.asarray(x[i : i + batch])) == jnp.asarray(y[i : i + batch]))
    )
  return correct / len(x)


def to_rgb(images: np.ndarray) -> np.ndarray:
  """uint8 ``(N, 28, 28)`` or ``(N, 28, 28, 3)`` to float32 ``(N, 28, 28, 3)`` in [-0.5, 0.5]."""
  x = np.asarray(images, np.float32) / 255.0 - 0.5
  return np.repeat(x[..., None], 3, axis=-1) if x.ndim == 3 else x
