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

The two quadratic programs are K-dimensional and are solved exactly inside ``jit`` by a
finite active-set method (``simplex_qp``: Wolfe's minimum-norm-point algorithm with a
linear term), in at least float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kbeam_jax._checks import check_steps
from kbeam_jax._tree import PyTree


def epsilon_set(values: jax.Array, epsilon: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Boolean mask of the valid beams whose value is within ``epsilon`` of the largest valid
  value; ``valid`` defaults to the finite values (NaN and ±inf never enter the set).

  Examples:
    >>> import jax.numpy as jnp
    >>> epsilon_set(jnp.array([1.0, 0.95, 0.5]), 0.1)
    Array([ True,  True, False], dtype=bool)
    >>> epsilon_set(jnp.array([jnp.nan, 0.95, 0.5]), 0.1)
    Array([False,  True, False], dtype=bool)
  """
  valid = jnp.isfinite(values) if valid is None else valid & jnp.isfinite(values)
  f_max = jnp.max(jnp.where(valid, values, -jnp.inf))
  return valid & (f_max - values <= epsilon)


def project_simplex(y: jax.Array, mask: jax.Array) -> jax.Array:
  """Euclidean projection of ``y`` onto ``{λ >= 0, Σλ = 1, λ_k = 0 off mask}``.

  The sort-based algorithm (Held, Wolfe & Crowder 1974): with the masked-in entries
  sorted in decreasing order ``s``, ``θ = (Σ_{i<=r} s_i - 1) / r`` for the largest ``r``
  with ``s_r > θ_r``, and ``λ = max(y - θ, 0)``. ``mask`` must have a True entry.

  Examples:
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


def _solve_pd(H: jax.Array, rhs: jax.Array) -> jax.Array:
  """``H⁻¹ rhs`` for a small positive definite ``H`` by Gauss-Jordan elimination.

  No pivoting is needed (every pivot of a positive definite matrix is positive) and no
  LAPACK call is made: for the K of K-beam (up to a few dozen) K fused row operations are
  faster than a library solve, on the CPU and batched under ``vmap``.
  """
  K = H.shape[0]
  M = jnp.concatenate([H, rhs[:, None]], axis=1)

  def eliminate(k, M):
    row = M[k] / M[k, k]
    M = M - M[:, k, None] * row[None, :]
    return M.at[k].set(row)

  M = jax.lax.fori_loop(0, K, eliminate, M, unroll=K <= 32)
  return M[:, K]


def simplex_qp(
  gram: jax.Array, linear: jax.Array, mask: jax.Array, max_steps: int | None = None
) -> jax.Array:
  """Minimizes ``½λᵀGλ - λᵀb`` over the simplex of the masked-in entries, exactly.

  A finite active-set method: Wolfe's minimum-norm-point algorithm (1976), generalized
  to a linear term. It keeps a support set ``S`` and feasible weights ``λ``; each
  iteration minimizes the objective on the affine hull of ``S`` (a ``|S| - 1``
  dimensional linear system in the differences ``z_k - z_r``), then either

  * the minimizer ``μ`` is in the simplex: ``λ = μ``; stop if no masked-in entry
    lowers the objective (``min_j (Gλ - b)_j >= λᵀ(Gλ - b)``, to a tolerance of
    ``128 ε_mach`` times the problem's scale), else add the steepest entry to ``S``;
  * or it is not: move from ``λ`` towards ``μ`` to the simplex's boundary and drop
    the entries that reach zero.

  It stops after about ``2|S*|`` iterations (``S*`` the optimal support), at most
  ``max_steps``; every iterate is feasible. The arithmetic is done in at least float32
  (float16 and bfloat16 inputs are upcast), so it neither overflows nor loses the
  weights in low precision; the result has the working dtype. Entries off the mask
  (NaN included) are ignored; with an empty mask the weights are all zero.

  Args:
    gram: ``(K, K)`` positive semi-definite matrix ``G`` (the Gram matrix of the
      gradients ``z_k``).
    linear: ``(K,)`` vector ``b``.
    mask: ``(K,)`` booleans; weights off the mask are zero.
    max_steps: cap on the iterations (add or drop steps); default ``4K + 10``.

  Returns:
    The ``(K,)`` weights, in ``promote_types(gram.dtype, float32)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> G = jnp.array([[1.0, -1.0], [-1.0, 1.0]])  # z_1 = 1, z_2 = -1
    >>> simplex_qp(G, jnp.zeros(2), jnp.array([True, True]))
    Array([0.5, 0.5], dtype=float32)

  References:
    Wolfe, Finding the nearest point in a polytope, Math. Programming 11, 1976.
  """
  K = jnp.shape(gram)[0] if jnp.ndim(gram) else 0
  if jnp.shape(gram) != (K, K) or K < 1 or jnp.shape(linear) != (K,) or jnp.shape(mask) != (K,):
    raise ValueError(
      f"simplex_qp needs gram (K, K), linear (K,) and mask (K,) with K >= 1; got gram "
      f"{jnp.shape(gram)}, linear {jnp.shape(linear)}, mask {jnp.shape(mask)}."
    )
  if jnp.result_type(mask) != jnp.bool_:
    raise TypeError(f"simplex_qp's mask must be boolean, got {jnp.result_type(mask)}.")
  max_steps = 4 * K + 10 if max_steps is None else check_steps("max_steps", max_steps)
  work = jnp.promote_types(gram.dtype, jnp.float32)
  idx = jnp.arange(K)
  G = jnp.where(mask[:, None] & mask[None, :], gram.astype(work), 0.0)
  b = jnp.where(mask, linear.astype(work), 0.0)
  eps = jnp.finfo(work).eps
  scale = jnp.maximum(jnp.max(jnp.abs(jnp.diag(G))) + jnp.max(jnp.abs(b)), jnp.finfo(work).tiny)
  ridge, tol = 4 * eps * scale, 128 * eps * scale

  def affine_minimizer(S, lam):
    # μ = e_r + Σ_{k in T} y_k (e_k - e_r), T = S \ {r}: minimize over y without a constraint.
    r = jnp.argmax(jnp.where(S, lam, -1.0))
    T = S & (idx != r)
    g = G[:, r]
    H = G - g[:, None] - g[None, :] + G[r, r]  # <z_j - z_r, z_k - z_r>
    H = jnp.where(T[:, None] & T[None, :], H, 0.0) + jnp.diag(jnp.where(T, ridge, 1.0))
    y = _solve_pd(H, jnp.where(T, (b - b[r]) - (g - G[r, r]), 0.0))
    return y.at[r].set(1.0 - jnp.sum(y))

  def body(carry):
    i, S, lam, _ = carry
    mu = jnp.where(S, affine_minimizer(S, lam), 0.0)
    inside = jnp.all(jnp.where(S, mu > 0, True))
    grad = G @ mu - b
    j = jnp.argmin(jnp.where(mask, grad, jnp.inf))
    optimal = grad[j] >= jnp.dot(mu, grad) - tol
    # Not inside: the largest step from λ towards μ that stays feasible.
    neg = S & (mu <= 0)
    gap = lam - mu
    ratio = jnp.where(neg, jnp.where(gap > 0, lam / jnp.where(gap > 0, gap, 1.0), 0.0), jnp.inf)
    theta = jnp.clip(jnp.min(ratio), 0.0, 1.0)
    lam_b = lam + theta * (mu - lam)
    S_b = S & (idx != jnp.argmin(ratio)) & (lam_b > 0)
    lam_b = jnp.where(S_b, lam_b, 0.0)
    lam_b = lam_b / jnp.maximum(jnp.sum(lam_b), jnp.finfo(work).tiny)
    S = jnp.where(inside, S | (idx == j), S_b)
    return i + 1, S, jnp.where(inside, mu, lam_b), inside & optimal

  k0 = jnp.argmin(jnp.where(mask, 0.5 * jnp.diag(G) - b, jnp.inf))
  lam0 = jnp.where(jnp.any(mask), jax.nn.one_hot(k0, K, dtype=work), 0.0)
  init = (jnp.zeros([], jnp.int32), lam0 > 0, lam0, ~jnp.any(mask))
  cond = lambda c: (~c[3]) & (c[0] < max_steps)
  return jax.lax.while_loop(cond, body, init)[2]


def gram_matrix(z: PyTree) -> jax.Array:
  """``G_jk = <z_j, z_k>`` for a pytree of gradients stacked on a leading axis K.

  Accumulated in at least float32 (a float16 Gram matrix overflows once |z| > 256).
  """
  leaves = jax.tree.leaves(z)
  K = leaves[0].shape[0]
  work = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
  flat = [leaf.reshape(K, -1).astype(work) for leaf in leaves]
  return sum(jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST) for x in flat)


def combine(weights: jax.Array, z: PyTree) -> PyTree:
  """``Σ_k λ_k z_k`` for a pytree stacked on a leading axis K."""
  return jax.tree.map(
    lambda x: jnp.tensordot(
      weights.astype(x.dtype), x, axes=1, precision=jax.lax.Precision.HIGHEST
    ),
    z,
  )


def min_norm_weights(gram: jax.Array, mask: jax.Array, max_steps: int | None) -> jax.Array:
  """Weights of the minimum-norm point of the convex hull of the masked gradients."""
  return simplex_qp(gram, jnp.zeros(gram.shape[0], gram.dtype), mask, max_steps)


def kiwiel_weights(
  gram: jax.Array, values: jax.Array, mask: jax.Array, max_steps: int | None
) -> jax.Array:
  """Weights of Kiwiel's linearization step: ``max_λ Σλ_k (f_k - f_max) - ½λᵀGλ``.

  ``f_max`` is the largest value on the mask; values off the mask are ignored.
  """
  values = jnp.where(mask, values.astype(gram.dtype), -jnp.inf)
  gap = jnp.where(mask, values - jnp.max(values), 0.0)
  return simplex_qp(gram, gap, mask, max_steps)


def random_weights(key: jax.Array, mask: jax.Array, dtype: Any) -> jax.Array:
  """Weights drawn uniformly from the simplex of the masked-in entries (Dirichlet(1))."""
  # -log of a uniform in [tiny, 1): exponential draws that are never exactly zero.
  e = -jnp.log(jax.random.uniform(key, mask.shape, dtype, minval=jnp.finfo(dtype).tiny))
  e = jnp.where(mask, e, 0.0)
  return e / jnp.sum(e)


# --------------------------------------------------------------------- rules as values


@dataclasses.dataclass(frozen=True)
class Rule:
  """How the leader's direction is formed from the beams: a value that carries its
  behaviour (its weights over the ε-set, and for ``Kiwiel`` its line search).

  ``all_gradients``: the rule needs ``∇_u f`` at every beam (the ε-rules); without it the
  leader steps along the best beam's gradient alone (``Best``). ``weights(values, gram,
  mask, key, min_norm, qp_steps, solve)`` returns the convex weights over the ε-set
  ``mask`` (``min_norm``: the certificate's weights, already computed; ``solve(fn, *xs)``
  runs a K-sized QP where the beams live).
  """

  all_gradients: ClassVar[bool] = True

  def epsilon_at(self, count: jax.Array) -> jax.Array:
    """ε at step ``count`` (a constant or a schedule)."""
    eps = getattr(self, "epsilon", 0.0)
    return eps(count) if callable(eps) else jnp.asarray(eps)

  def weights(self, values, gram, mask, key, min_norm, qp_steps, solve):
    raise NotImplementedError(f"{type(self).__name__} does not define weights().")

  def search(self, f, u, u_new, beams, direction, args, project_u):
    """The leader's accepted point: ``(u, scale, ∇_v f at every beam there or None)``.
    Without a line search the proposed step is taken whole."""
    del f, u, beams, args, project_u
    return u_new, jnp.ones([], direction.values.dtype), None


def _check_epsilon(owner: str, epsilon: Any) -> None:
  if callable(epsilon):
    return
  ok = isinstance(epsilon, int | float | np.number) and not isinstance(epsilon, bool)
  if not (ok and np.isfinite(epsilon) and epsilon >= 0):
    raise ValueError(
      f"{owner}.epsilon must be a finite number >= 0 or a schedule count -> ε, got "
      f"epsilon={epsilon!r}."
    )


@dataclasses.dataclass(frozen=True)
class Best(Rule):
  """The basic K-beam step: the gradient at the best beam only (ε = 0).

  Examples:
    >>> from kbeam_jax import minimax
    >>> minimax.Best()
    Best()
  """

  all_gradients: ClassVar[bool] = False


BEST = Best()  # the default rule (a frozen value: safe to share)


@dataclasses.dataclass(frozen=True)
class EpsilonRule(Rule):
  """A rule over the ε-set ``R = {k : f_max - f_k <= ε}``: ``epsilon`` is ε >= 0, or a
  schedule ``count -> ε``, checked when the rule is made."""

  epsilon: float | Callable[[jax.Array], jax.Array] = 0.0

  def __post_init__(self):
    _check_epsilon(type(self).__name__, self.epsilon)


@dataclasses.dataclass(frozen=True)
class Random(EpsilonRule):
  """A random convex combination of the ε-set's gradients (the paper's Algorithm 2):
  ``λ ~ Dirichlet(1, ..., 1)`` on ``R = {k : f_max - f_k <= ε}``.

  Attributes:
    epsilon: ε >= 0, or a schedule ``count -> ε``.

  Examples:
    >>> from kbeam_jax import minimax
    >>> minimax.Random(0.1)
    Random(epsilon=0.1)
  """

  def weights(self, values, gram, mask, key, min_norm, qp_steps, solve):
    del gram, min_norm, qp_steps, solve
    return random_weights(key, mask, values.dtype)


@dataclasses.dataclass(frozen=True)
class MinNorm(EpsilonRule):
  """The minimum-norm element of the ε-set's gradient hull: Demyanov's steepest
  ε-descent; its norm is the stationarity certificate.

  Attributes:
    epsilon: ε >= 0, or a schedule ``count -> ε``.

  Examples:
    >>> from kbeam_jax import minimax
    >>> minimax.MinNorm(0.01)
    MinNorm(epsilon=0.01)
  """

  def weights(self, values, gram, mask, key, min_norm, qp_steps, solve):
    del values, gram, mask, key, qp_steps, solve
    return min_norm


@dataclasses.dataclass(frozen=True)
class Kiwiel(EpsilonRule):
  """Kiwiel's linearization step over the ε-set (the minimax filter's rule), then an
  Armijo backtracking line search on ``F(u) = max_k f(u, v_k)`` over the scale of the
  leader's proposed step; if no scale passes, the step is null (``u`` stays). The line
  search tries scales one at a time and usually stops at the first; its evaluation of
  the beams at the accepted point gives their next ascent gradients. (The optax form
  ``scale_by_kbeam`` uses the weights without the line search.)

  Attributes:
    epsilon: ε >= 0, or a schedule ``count -> ε``.
    armijo: the sufficient-decrease constant, in (0, 1).
    backtrack: the factor by which a scale shrinks, in (0, 1).
    max_backtracks: the most scales tried before the null step, >= 1.

  Examples:
    >>> from kbeam_jax import minimax
    >>> minimax.Kiwiel(0.1)
    Kiwiel(epsilon=0.1, armijo=0.0001, backtrack=0.5, max_backtracks=10)
  """

  armijo: float = 1e-4
  backtrack: float = 0.5
  max_backtracks: int = 10

  def __post_init__(self):
    super().__post_init__()
    for name in ("armijo", "backtrack"):
      value = getattr(self, name)
      ok = isinstance(value, int | float | np.number) and not isinstance(value, bool)
      if not (ok and 0 < value < 1):
        raise ValueError(f"Kiwiel.{name} must be a number in (0, 1), got {name}={value!r}.")
    n = self.max_backtracks
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
      raise ValueError(f"Kiwiel.max_backtracks must be an int >= 1, got {n!r}.")

  def weights(self, values, gram, mask, key, min_norm, qp_steps, solve):
    del key, min_norm
    return solve(lambda g, v, m: kiwiel_weights(g, v, m, qp_steps), gram, values, mask)

  def search(self, f, u, u_new, beams, direction, args, project_u):
    """The largest scale ``t = backtrack**i`` whose point passes Armijo on ``max_k f``;
    a last trial at ``t = 0`` keeps ``u`` (the null step)."""
    d = direction
    dtype = d.values.dtype
    evaluate = jax.vmap(jax.value_and_grad(f, argnums=1), in_axes=(None, 0) + (None,) * len(args))
    F0 = jnp.max(jnp.where(d.valid, d.values, -jnp.inf))
    step = jax.tree.map(jnp.subtract, u_new, u)

    def attempt(i):
      last = i == self.max_backtracks
      t = jnp.where(last, 0.0, jnp.asarray(self.backtrack, dtype) ** i)
      trial = project_u(jax.tree.map(lambda x, s: x + t.astype(x.dtype) * s, u, step))
      trial = jax.tree.map(lambda a, b: jnp.where(last, a, b), u, trial)
      values, grads = evaluate(trial, beams, *args)
      moved = sum(
        jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(d.z),
                                       jax.tree.leaves(jax.tree.map(jnp.subtract, trial, u)),
                                       strict=True)
      ).astype(dtype)  # fmt: skip
      # Armijo on the aggregate gradient; a trial that does not move downhill along z is
      # never accepted (with momentum or Adam the proposed step need not follow -z).
      F = jnp.max(jnp.where(d.valid, values, -jnp.inf))
      ok = ((F <= F0 + self.armijo * moved) & (moved < 0)) | last
      return i + 1, ok, trial, t, grads

    # The first scale in straight-line code (XLA fuses it with the rest of the step); the
    # loop runs only when it fails.
    first = attempt(jnp.zeros([], jnp.int32))
    _, _, u, t, grads = jax.lax.while_loop(lambda c: ~c[1], lambda c: attempt(c[0]), first)
    return u, t, grads


def check_rule(rule: Any) -> Rule:
  """Returns ``rule`` if it is a rule value, else raises naming the choices."""
  if isinstance(rule, Rule) and type(rule) is not Rule:
    return rule
  hint = ""
  if isinstance(rule, str):
    name = {"best": "Best()", "random": "Random(epsilon)", "min_norm": "MinNorm(epsilon)",
            "kiwiel": "Kiwiel(epsilon)"}.get(rule)  # fmt: skip
    if name:
      hint = f" Rules are values now: rule=minimax.{name}."
  elif isinstance(rule, type) and issubclass(rule, Rule):
    hint = f" Pass a value, not the class: rule=minimax.{rule.__name__}(...)."
  raise TypeError(
    "rule must be minimax.Best(), minimax.Random(epsilon), minimax.MinNorm(epsilon) or "
    f"minimax.Kiwiel(epsilon, ...), got {rule!r}.{hint}"
  )
