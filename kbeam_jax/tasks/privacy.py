"""The minimax filter (Hamm, JMLR 2017): features that keep one task and hide another.

A filter ``g(x; u)`` maps a face ``x`` to ``d`` features; a utility classifier ``w``
predicts expression from them and an adversary ``v`` predicts gender. The filter and the
utility classifier play against the adversary:

``min_{u, w} max_v  -f_priv(u, v) + ρ f_util(u, w)``,

with ``f_priv`` and ``f_util`` the cross-entropy losses of multiclass logistic regression
on the filtered features (plus a small L2 term on every classifier). The adversary's
best response maximizes ``-f_priv``: it is the best gender classifier for the current
filter, so the leader minimizes ``max_v -f_priv`` = makes the best adversary's loss high.

The evaluation is the author's: after training, fresh logistic regressions are fitted on
the filtered training set, one per task, and their test accuracies are reported.

Reference: Hamm, Minimax Filter: Learning to Preserve Privacy from Inference Attacks,
JMLR 18(129), 2017.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kbeam_jax._tree import PyTree
from kbeam_jax.tasks._classifiers import cross_entropy as cross_entropy


class LinearFilter(nnx.Module):
  """``g(x) = x U``, ``U`` of shape ``(dim_in, dim_out)``."""

  def __init__(self, dim_in: int, dim_out: int, rngs: nnx.Rngs):
    self.proj = nnx.Linear(dim_in, dim_out, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x)


class MLPFilter(nnx.Module):
  """``g(x) = tanh(x W1 + b1) W2 + b2``, a two-layer network filter."""

  def __init__(self, dim_in: int, dim_out: int, rngs: nnx.Rngs, hidden: int = 64):
    self.l1 = nnx.Linear(dim_in, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, dim_out, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.l2(jnp.tanh(self.l1(x)))


class LogisticRegression(nnx.Module):
  """Multiclass logistic regression: logits ``z W + b``."""

  def __init__(self, dim_in: int, num_classes: int, rngs: nnx.Rngs):
    self.linear = nnx.Linear(dim_in, num_classes, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    return self.linear(z)


def sq_norm(tree: PyTree) -> jax.Array:
  return sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))


def objective(
  filter_def: nnx.GraphDef,
  classifier_def: nnx.GraphDef,
  rho: float,
  l2: float = 1e-3,
) -> Callable[..., jax.Array]:
  """``f(u, v, x, y_util, y_priv) = -f_priv(u, v) + ρ f_util(u, w)``.

  ``u = {"filter": ..., "utility": ...}`` (the leader: filter and utility classifier),
  ``v`` the adversary's parameters; ``f_priv`` and ``f_util`` are cross-entropies with
  ``l2/2·|·|²`` on the classifier that owns them.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from kbeam_jax.tasks import privacy
    >>> fdef, filt = nnx.split(privacy.LinearFilter(4, 2, nnx.Rngs(0)), nnx.Param)
    >>> cdef, w = nnx.split(privacy.LogisticRegression(2, 2, nnx.Rngs(1)), nnx.Param)
    >>> f = privacy.objective(fdef, cdef, rho=10.0)
    >>> y = jnp.array([0, 1, 0])
    >>> f({"filter": filt, "utility": w}, w, jnp.ones((3, 4)), y, y).shape
    ()
  """
  if rho < 0:
    raise ValueError(f"rho (the utility weight) must be >= 0, got {rho}.")

  def f(u, v, x, y_util, y_priv):
    z = nnx.merge(filter_def, u["filter"])(x)
    util = cross_entropy(nnx.merge(classifier_def, u["utility"])(z), y_util)
    priv = cross_entropy(nnx.merge(classifier_def, v)(z), y_priv)
    return -(priv + 0.5 * l2 * sq_norm(v)) + rho * (util + 0.5 * l2 * sq_norm(u["utility"]))

  return f


def standardize(train: jax.Array, test: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Zero mean, unit variance per feature, with the training set's statistics."""
  mean = jnp.mean(train, axis=0, keepdims=True)
  std = jnp.std(train, axis=0, keepdims=True) + 1e-6
  return (train - mean) / std, (test - mean) / std


def retrain_accuracy(
  z_train: jax.Array,
  y_train: jax.Array,
  z_test: jax.Array,
  y_test: jax.Array,
  *,
  num_classes: int = 2,
  l2: float = 1e-3,
  steps: int = 500,
) -> jax.Array:
  """Test accuracy of a logistic regression fitted from zero on ``(z_train, y_train)``.

  Features are standardized with the training statistics; the fit is ``steps`` of
  full-batch L-BFGS on cross-entropy + ``l2/2·|W|²``, which is convex, so the result
  does not depend on an initialization.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax.tasks import privacy
    >>> z = jax.random.normal(jax.random.key(0), (200, 3))
    >>> y = (z[:, 0] > 0).astype(jnp.int32)
    >>> float(privacy.retrain_accuracy(z[:100], y[:100], z[100:], y[100:])) > 0.9
    True
  """
  z_train, z_test = standardize(z_train, z_test)
  params = (jnp.zeros((z_train.shape[1], num_classes)), jnp.zeros(num_classes))

  def loss(p):
    W, b = p
    return cross_entropy(z_train @ W + b[None, :], y_train) + 0.5 * l2 * jnp.sum(W**2)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def body(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(p, updates), state), None

  (params, _), _ = jax.lax.scan(body, (params, solver.init(params)), length=steps)
  W, b = params
  return jnp.mean(jnp.argmax(z_test @ W + b[None, :], axis=-1) == y_test)


def pca_filter(x: jax.Array, dim_out: int) -> jax.Array:
  """``(dim_in, dim_out)`` projection onto the top principal components of ``x``."""
  centered = x - jnp.mean(x, axis=0, keepdims=True)
  _, _, vt = jnp.linalg.svd(centered, full_matrices=False)
  return vt[:dim_out].T


def random_filter(key: jax.Array, dim_in: int, dim_out: int) -> jax.Array:
  """A Gaussian random projection ``(dim_in, dim_out)``."""
  return jax.random.normal(key, (dim_in, dim_out)) / jnp.sqrt(dim_in)


def retrain_mlp_accuracy(
  z_train: jax.Array,
  y_train: jax.Array,
  z_test: jax.Array,
  y_test: jax.Array,
  key: jax.Array,
  *,
  num_classes: int = 2,
  hidden: int = 64,
  weight_decay: float = 1e-3,
  steps: int = 1000,
) -> jax.Array:
  """Test accuracy of a fresh two-layer network (``hidden`` tanh units) on the features.

  A stronger attacker than the logistic regression the filter was trained against:
  full-batch Adam (lr 1e-2) with weight decay on standardized features.
  """
  z_train, z_test = standardize(z_train, z_test)
  k1, k2 = jax.random.split(key)
  d = z_train.shape[1]
  params = {
    "W1": jax.random.normal(k1, (d, hidden)) / jnp.sqrt(d),
    "b1": jnp.zeros(hidden),
    "W2": jax.random.normal(k2, (hidden, num_classes)) / jnp.sqrt(hidden),
    "b2": jnp.zeros(num_classes),
  }
  net = lambda p, z: jnp.tanh(z @ p["W1"] + p["b1"][None]) @ p["W2"] + p["b2"][None]
  tx = optax.adamw(1e-2, weight_decay=weight_decay)

  def body(carry, _):
    p, state = carry
    grads = jax.grad(lambda p: cross_entropy(net(p, z_train), y_train))(p)
    updates, state = tx.update(grads, state, p)
    return (optax.apply_updates(p, updates), state), None

  (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), length=steps)
  return jnp.mean(jnp.argmax(net(params, z_test), axis=-1) == y_test)
