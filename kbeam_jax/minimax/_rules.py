"""Descent directions from K beams: the ε-set, the simplex subproblems and the rules.

Given the beam values ``f_k = f(u, v_k)`` and gradients ``z_k = ∇_u f(u, v_k)``, the
ε-set is ``R = {k : f_max - f_k <= ε}`` and every rule returns convex weights ``λ`` on
``R`` (zero off ``R``); the direction is ``z = Σ_k λ_k z_k`` and the leader steps along
``-z``:

* ``best``      ``λ`` one-hot at ``argmax_k f_k`` (the basic K-beam step, ε = 0);
* ``random``    ``λ ~ Dirichlet(1, ..., 1)`` on ``R`` (uniform on the simplex: the
  paper's "randomly choose z in the convex hull");
* ``min_norm``  ``λ = argmin ½|Σλ_k z_k|²`` on the simplex of ``R`` (Demyanov's
  steepest ε-descent; ``|z|`` is the stationarity certificate);
* ``kiwiel``    ``λ = argmax Σλ_k (f_k - f_max) - ½|Σλ_k z_k|²`` on the simplex of ``R``
  (the dual of Kiwiel's linearized subproblem ``min_q max_k f_k + <z_k, q> + ½|q|²``).

The two quadratic programs are K-dimensional and are solved inside ``jit`` by
accelerated projected gradient (FISTA) with a fixed number of iterations.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

RULES = ("best", "random", "min_norm", "kiwiel")


def epsilon_set(values: jax.Array, epsilon: jax.Array) -> jax.Array:
  """Boolean mask of the beams whose value is within ``epsilon`` of the maximum.

  Example:
    >>> import jax.numpy as jnp
    >>> epsilon_set(jnp.array([1.0, 0.95, 0.5]), 0.1)
    Array([ True,  True, False], dtype=bool)
  """
  return jnp.max(values) - values <= epsilon


def project_simplex(y: jax.Array, mask: jax.Array) -> jax.Array:
  """Euclidean projection of ``y`` onto ``{λ >= 0, Σλ = 1, λ_k = 0 off mask}``.

  The sort-based algorithm (Held, Wolfe & Crowder 1974): with the masked-in entries
  sorted in decreasing order ``s``, ``θ = (Σ_{i<=r} s_i - 1) / r`` for the largest ``r``
  with ``s_r > θ_r``, and ``λ = max(y - θ, 0)``. ``mask`` must have a True entry.

  Example:
    >>> import jax.numpy as jnp
    >>> project_simplex(jnp.array([0.5, 0.5, 3.0]), jnp.array([True, True, False]))
    Array([0.5, 0.5, 0. ], dtype=float32)
  """
  K = y.shape[0]
  order = jnp.argsort(jnp.where(mask, -y, jnp.inf))  # masked-in entries first, largest first
  s = y[order]
  valid = mask[order]
  rank = jnp.arange(1, K + 1, dtype=y.dtype)
  cumsum = jnp.cumsum(jnp.where(valid, s, 0.0))
  above = valid & (s - (cumsum - 1.0) / rank > 0)
  r = jnp.max(jnp.where(above, jnp.arange(K), 0))
  theta = (cumsum[r] - 1.0) / rank[r]
  return jnp.where(mask, jnp.maximum(y - theta, 0.0), 0.0)


def simplex_qp(gram: jax.Array, linear: jax.Array, mask: jax.Array, num_iters: int) -> jax.Array:
  """Minimizes ``½λᵀGλ - λᵀb`` over the simplex of the masked-in entries.

  FISTA with step ``1 / trace(G_R)`` (an upper bound on the largest eigenvalue of the
  masked Gram matrix, so every step is stable), started at the uniform weights on the
  mask, for ``num_iters`` iterations inside a ``fori_loop``.

  Args:
    gram: ``(K, K)`` positive semi-definite matrix ``G``.
    linear: ``(K,)`` vector ``b``.
    mask: ``(K,)`` booleans; weights off the mask are zero.
    num_iters: fixed number of iterations.

  Returns:
    The ``(K,)`` weights.

  Example:
    >>> import jax.numpy as jnp
    >>> G = jnp.array([[1.0, -1.0], [-1.0, 1.0]])  # z_1 = 1, z_2 = -1
    >>> simplex_qp(G, jnp.zeros(2), jnp.array([True, True]), 100)
    Array([0.5, 0.5], dtype=float32)
  """
  maskf = mask.astype(gram.dtype)
  scale = jnp.sum(jnp.diag(gram) * maskf)
  step = 1.0 / jnp.maximum(scale, jnp.finfo(gram.dtype).tiny)
  lam0 = maskf / jnp.sum(maskf)

  def body(_, carry):
    lam, y, t = carry
    lam_next = project_simplex(y - step * (gram @ y - linear), mask)
    t_next = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
    y_next = lam_next + ((t - 1.0) / t_next) * (lam_next - lam)
    return lam_next, y_next, t_next

  one = jnp.ones([], gram.dtype)
  lam, _, _ = jax.lax.fori_loop(0, num_iters, body, (lam0, lam0, one))
  return lam


def gram_matrix(z: PyTree) -> jax.Array:
  """``G_jk = <z_j, z_k>`` for a pytree of gradients stacked on a leading axis K."""
  leaves = jax.tree.leaves(z)
  K = leaves[0].shape[0]
  flat = [leaf.reshape(K, -1) for leaf in leaves]
  return sum(jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST) for x in flat)


def combine(weights: jax.Array, z: PyTree) -> PyTree:
  """``Σ_k λ_k z_k`` for a pytree stacked on a leading axis K."""
  return jax.tree.map(
    lambda x: jnp.tensordot(
      weights.astype(x.dtype), x, axes=1, precision=jax.lax.Precision.HIGHEST
    ),
    z,
  )


def min_norm_weights(gram: jax.Array, mask: jax.Array, num_iters: int) -> jax.Array:
  """Weights of the minimum-norm point of the convex hull of the masked gradients."""
  return simplex_qp(gram, jnp.zeros(gram.shape[0], gram.dtype), mask, num_iters)


def kiwiel_weights(
  gram: jax.Array, values: jax.Array, mask: jax.Array, num_iters: int
) -> jax.Array:
  """Weights of Kiwiel's linearization step: ``max_λ Σλ_k (f_k - f_max) - ½λᵀGλ``."""
  gap = (values - jnp.max(values)).astype(gram.dtype)
  return simplex_qp(gram, gap, mask, num_iters)


def random_weights(key: jax.Array, mask: jax.Array, dtype: Any) -> jax.Array:
  """Weights drawn uniformly from the simplex of the masked-in entries (Dirichlet(1))."""
  # -log of a uniform in [tiny, 1): exponential draws that are never exactly zero.
  e = -jnp.log(jax.random.uniform(key, mask.shape, dtype, minval=jnp.finfo(dtype).tiny))
  e = jnp.where(mask, e, 0.0)
  return e / jnp.sum(e)


def check_rule(rule: str) -> str:
  """Returns ``rule`` if it is one of ``RULES``, else raises naming the choices."""
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got rule={rule!r}.")
  return rule
