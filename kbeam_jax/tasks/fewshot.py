r"""Few-shot learning as a bilevel problem: a shared representation, one head per task.

The formulation of the slides (Hamm, deep adversarial learning, "few-shot learning"):

    min_u  Σ_i E_val(u, w_i*)   s.t.   w_i* = argmin_{w_i} E_tr(u, w_i),

with ``T(x; u)`` a representation shared by all tasks (the upper variable ``u``) and
``h_i(z; w_i)`` a linear head per task (the lower variables), ``E_tr`` the loss on task
i's support set and ``E_val`` the loss on its query set.

The heads of a meta-batch of B tasks are one lower variable stacked on a leading axis
(``{"w": (B, d, n), "b": (B, n)}``) and the lower objective is the *sum* of the per-task
objectives, ``g(u, W) = Σ_i [E_tr(u, w_i) + (λ/2)|w_i|²]``. The tasks do not interact,
so ``∇²_WW g`` is block diagonal, one descent step on ``W`` is one step on every head with
the same step size, and every method of the library (``bilevel.RMD()``,
``bilevel.ApproxGrad(...)``, the penalty method) applies to the whole meta-batch in one call:
the result equals the per-task hypergradients vmapped and averaged, because the upper
objective is the *mean* query loss ``f(u, W) = (1/B) Σ_i E_val(u, w_i)``. The ridge term
``λ`` makes each lower problem strongly convex (a 1-shot support set is separable, so
without it the cross-entropy has no minimizer).

The representation is a ReLU MLP whose output is rescaled to a fixed norm
(``feature_scale``): the curvature of the lower problem then stays bounded while ``u``
trains, so one fixed inner step size is stable throughout.

Problems: N-way K-shot classification over a pool of classes (``class_pool`` makes one
from labelled images, with the rotations by 90° as extra classes the way Omniglot is
augmented; ``sample_classification`` draws episodes) and the sinusoid regression of
Finn et al. 2017 (``sample_sinusoid``).

References:
  Hamm, deep adversarial learning slides (bilevel applications: few-shot learning);
  Franceschi et al., Bilevel Programming for Hyperparameter Optimization and
  Meta-Learning, ICML 2018 (shared representation, per-task linear heads);
  Finn et al., Model-Agnostic Meta-Learning, ICML 2017 (the sinusoid tasks);
  Santoro et al., Meta-Learning with Memory-Augmented Neural Networks, ICML 2016
  (rotations of Omniglot characters as new classes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kbeam_jax._tree import PyTree
from kbeam_jax.tasks._episodes import ClassPool as ClassPool
from kbeam_jax.tasks._episodes import Episodes as Episodes
from kbeam_jax.tasks._episodes import _check_positive
from kbeam_jax.tasks._episodes import class_pool as class_pool
from kbeam_jax.tasks._episodes import sample_classification as sample_classification
from kbeam_jax.tasks._episodes import sample_sinusoid as sample_sinusoid

# Listed so that the API reference renders the names defined in _episodes.py here too.
__all__ = [
  "KINDS",
  "ClassPool",
  "Episodes",
  "apply_heads",
  "class_pool",
  "evaluate",
  "features",
  "fit_heads",
  "init_heads",
  "init_mlp",
  "mean_ci95",
  "nearest_centroid_accuracy",
  "objectives",
  "sample_classification",
  "sample_sinusoid",
  "task_losses",
]

KINDS = ("classification", "regression")


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")


def init_mlp(key: jax.Array, sizes: Sequence[int], dtype=jnp.float32) -> list[dict[str, jax.Array]]:
  """He-initialized layers ``[{"w": (m, n), "b": (n,)}, ...]`` for ``sizes = [in, ..., out]``.

  Examples:
    >>> import jax
    >>> from kbeam_jax.tasks import fewshot
    >>> [p["w"].shape for p in fewshot.init_mlp(jax.random.key(0), [784, 64, 32])]
    [(784, 64), (64, 32)]
  """
  if len(sizes) < 2 or min(sizes) < 1:
    raise ValueError(f"sizes must list at least an input and an output size, got {sizes}.")
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    {
      "w": jax.random.normal(k, (m, n), dtype) * jnp.sqrt(2.0 / m).astype(dtype),
      "b": jnp.zeros((n,), dtype),
    }
    for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]


def features(u: PyTree, x: jax.Array, feature_scale: float | None = 1.0) -> jax.Array:
  """The representation ``T(x; u)``: a ReLU MLP (ReLU after every layer) on the last axis
  of ``x``, rescaled to norm ``feature_scale`` (``None``: not rescaled).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax.tasks import fewshot
    >>> u = fewshot.init_mlp(jax.random.key(0), [3, 8, 4])
    >>> z = fewshot.features(u, jnp.ones((2, 5, 3)), feature_scale=2.0)
    >>> z.shape, jnp.allclose(jnp.linalg.norm(z, axis=-1), 2.0)
    ((2, 5, 4), Array(True, dtype=bool))
  """
  lead = x.shape[:-1]
  z = x.reshape(-1, x.shape[-1])
  for layer in u:
    z = jax.nn.relu(z @ layer["w"] + layer["b"][None, :])
  if feature_scale is not None:
    z = feature_scale * z / jnp.sqrt(jnp.sum(z**2, axis=-1, keepdims=True) + 1e-6)
  return z.reshape(*lead, z.shape[-1])


def init_heads(num_tasks: int, feature_dim: int, num_outputs: int, dtype=jnp.float32) -> PyTree:
  """Zero linear heads for ``num_tasks`` tasks: ``{"w": (B, d, n), "b": (B, n)}``."""
  _check_positive(num_tasks=num_tasks, feature_dim=feature_dim, num_outputs=num_outputs)
  return {
    "w": jnp.zeros((num_tasks, feature_dim, num_outputs), dtype),
    "b": jnp.zeros((num_tasks, num_outputs), dtype),
  }


def apply_heads(heads: PyTree, z: jax.Array) -> jax.Array:
  """Per-task linear heads on per-task features ``(B, S, d)`` -> outputs ``(B, S, n)``."""
  return jnp.einsum("bsd,bdn->bsn", z, heads["w"]) + heads["b"][:, None, :]


def task_losses(kind: str, out: jax.Array, y: jax.Array) -> jax.Array:
  """Mean loss per task ``(B,)``: softmax cross-entropy (``y`` int labels) or squared error
  (``out (B, S, 1)``, ``y (B, S)``)."""
  _check_kind(kind)
  if kind == "classification":
    logp = jax.nn.log_softmax(out, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0], axis=-1)
  return jnp.mean((out[..., 0] - y) ** 2, axis=-1)


def _ridge(heads: PyTree) -> jax.Array:
  return 0.5 * (jnp.sum(heads["w"] ** 2, axis=(1, 2)) + jnp.sum(heads["b"] ** 2, axis=1))


def objectives(
  kind: str, *, l2: float, feature_scale: float | None = 1.0
) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
  r"""The bilevel pair ``(f, g)``, each ``(u, heads, episodes) -> scalar``.

  ``g(u, W) = Σ_i [E_tr(u, w_i) + (λ/2)|w_i|²]`` (support loss, summed over tasks),
  ``f(u, W) = (1/B) Σ_i E_val(u, w_i)`` (query loss, averaged).

  Args:
    kind: ``"classification"`` or ``"regression"``.
    l2: λ > 0, the ridge weight that makes every lower problem strongly convex.
    feature_scale: the norm of the features (see ``features``).

  Examples:
    >>> import jax
    >>> from kbeam_jax import bilevel
    >>> from kbeam_jax.tasks import fewshot
    >>> f, g = fewshot.objectives("regression", l2=1e-2)
    >>> ep = fewshot.sample_sinusoid(jax.random.key(0), num_tasks=3, k_shot=5, num_query=5)
    >>> u = fewshot.init_mlp(jax.random.key(1), [1, 16, 16])
    >>> heads = fewshot.init_heads(3, 16, 1)
    >>> out = bilevel.hypergradient(f, g, u, heads, ep, method=bilevel.ApproxGrad(20, 0.5),
    ...                             inner_steps=20, inner_lr=0.5)
    >>> out.v["w"].shape, [p["w"].shape for p in out.grad]
    ((3, 16, 1), [(1, 16), (16, 16)])
  """
  _check_kind(kind)
  if not l2 > 0:
    raise ValueError(f"l2 must be > 0 (it makes each lower problem strongly convex), got {l2}.")

  def g(u, heads, ep: Episodes):
    out = apply_heads(heads, features(u, ep.support_x, feature_scale))
    return jnp.sum(task_losses(kind, out, ep.support_y) + l2 * _ridge(heads))

  def f(u, heads, ep: Episodes):
    out = apply_heads(heads, features(u, ep.query_x, feature_scale))
    return jnp.mean(task_losses(kind, out, ep.query_y))

  return f, g


def fit_heads(
  kind: str,
  z: jax.Array,
  y: jax.Array,
  *,
  num_outputs: int,
  l2: float,
  inner_steps: int,
  inner_lr: float,
) -> PyTree:
  """Solves every task's lower problem on fixed features ``z (B, S, d)``: ``inner_steps``
  steps of gradient descent from zero heads (``bilevel.argmin``; the lower problem is
  strongly convex), not differentiated.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.tasks import fewshot
    >>> z = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])  # one task, two points
    >>> heads = fewshot.fit_heads("regression", z, jnp.array([[1.0, -1.0]]), num_outputs=1,
    ...                           l2=1e-3, inner_steps=500, inner_lr=0.5)
    >>> jnp.round(fewshot.apply_heads(heads, z)[..., 0], 2)
    Array([[ 1., -1.]], dtype=float32)
  """
  from kbeam_jax import bilevel

  heads = init_heads(z.shape[0], z.shape[-1], num_outputs, z.dtype)
  return bilevel.argmin(
    _support_loss(kind, l2),
    z,
    heads,
    y,
    method=bilevel.Naive(),
    inner_steps=inner_steps,
    inner_lr=inner_lr,
  )


@functools.cache
def _support_loss(kind: str, l2: float):
  """``g(z, heads, y)``: the tasks' support loss on fixed features (one object per
  setting, so that ``bilevel.argmin`` compiles once)."""
  return lambda z, h, y: jnp.sum(task_losses(kind, apply_heads(h, z), y) + l2 * _ridge(h))


def evaluate(
  kind: str,
  u: PyTree,
  ep: Episodes,
  *,
  num_outputs: int,
  l2: float,
  inner_steps: int,
  inner_lr: float,
  feature_scale: float | None = 1.0,
) -> jax.Array:
  """Per-task query metric ``(B,)`` after fitting each head on its support set:
  accuracy for classification, mean squared error for regression.

  Examples:
    >>> import jax
    >>> from kbeam_jax.tasks import fewshot
    >>> ep = fewshot.sample_sinusoid(jax.random.key(0), num_tasks=3, k_shot=5, num_query=5)
    >>> u = fewshot.init_mlp(jax.random.key(1), [1, 16, 16])
    >>> fewshot.evaluate("regression", u, ep, num_outputs=1, l2=1e-2, inner_steps=10,
    ...                  inner_lr=0.5).shape
    (3,)
  """
  _check_kind(kind)
  heads = fit_heads(
    kind,
    features(u, ep.support_x, feature_scale),
    ep.support_y,
    num_outputs=num_outputs,
    l2=l2,
    inner_steps=inner_steps,
    inner_lr=inner_lr,
  )
  out = apply_heads(heads, features(u, ep.query_x, feature_scale))
  if kind == "classification":
    return jnp.mean(jnp.argmax(out, axis=-1) == ep.query_y, axis=-1)
  return jnp.mean((out[..., 0] - ep.query_y) ** 2, axis=-1)


def nearest_centroid_accuracy(
  u: PyTree, ep: Episodes, *, n_way: int, feature_scale: float | None = 1.0
) -> jax.Array:
  """Per-task query accuracy ``(B,)`` of the nearest class mean of the support features
  (Euclidean), a non-bilevel classifier on the same representation.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.tasks import fewshot
    >>> x = jnp.array([[[0.0], [4.0]]])  # one task: class 0 at 0, class 1 at 4
    >>> ep = fewshot.Episodes(x, jnp.array([[0, 1]]), jnp.array([[[1.0], [3.5]]]),
    ...                       jnp.array([[0, 1]]))
    >>> fewshot.nearest_centroid_accuracy([], ep, n_way=2, feature_scale=None)
    Array([1.], dtype=float32)
  """
  zs = features(u, ep.support_x, feature_scale)
  zq = features(u, ep.query_x, feature_scale)
  onehot = jax.nn.one_hot(ep.support_y, n_way, dtype=zs.dtype)  # (B, S, N)
  centroids = jnp.einsum("bsn,bsd->bnd", onehot, zs) / jnp.sum(onehot, axis=1)[..., None]
  dist = jnp.sum((zq[:, :, None, :] - centroids[:, None, :, :]) ** 2, axis=-1)
  return jnp.mean(jnp.argmin(dist, axis=-1) == ep.query_y, axis=-1)


def mean_ci95(values: Any) -> tuple[float, float]:
  """Mean and the half-width of its normal 95% interval, ``1.96·std/√n``.

  Examples:
    >>> from kbeam_jax.tasks import fewshot
    >>> fewshot.mean_ci95([1.0, 3.0, 1.0, 3.0])
    (2.0, 0.98)
  """
  v = np.asarray(values, np.float64).ravel()
  if v.size == 0:
    raise ValueError("mean_ci95 needs at least one value.")
  return float(v.mean()), float(1.96 * v.std() / np.sqrt(v.size))
