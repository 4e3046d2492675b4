"""Multilevel programs (N-level Stackelberg) as nested ``bilevel.argmin``: three- and
four-level linear-quadratic chains against their closed form, every exact method, float64.

Level K: ``x_K*(x_{K-1}) = argmin ½|x_K - A_K x_{K-1}|² + ½x_Kᵀ D x_K``; level 1 < k < K:
``x_k*(x_{k-1}) = argmin ½|x_k - A_k x_{k-1}|² + ½|x_{k+1}*(x_k) - c_k|²``; the top level
minimizes ``F(x_1) = ½|x_1 - a|² + ½|x_2*(x_1) - c_1|²``. Every ``x_k*`` is affine,
``P_k x_{k-1} + p_k``, computed from the bottom up.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kbeam_jax import bilevel

DIM = 3


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def chain(levels, seed=0):
  rng = np.random.default_rng(seed)
  A = {k: 0.25 * rng.normal(size=(DIM, DIM)) for k in range(2, levels + 1)}
  c = {k: rng.normal(size=DIM) for k in range(1, levels)}
  D = np.diag(rng.uniform(0.1, 0.3, DIM))
  a = rng.normal(size=DIM)
  return A, c, D, a


def closed_form_gradient(levels, x1, seed=0):
  A, c, D, a = chain(levels, seed)
  I = np.eye(DIM)
  P, p = np.linalg.solve(I + D, A[levels]), np.zeros(DIM)
  for k in range(levels - 1, 1, -1):
    Q = I + P.T @ P
    P, p = np.linalg.solve(Q, A[k]), np.linalg.solve(Q, P.T @ (c[k] - p))
  x2 = P @ x1 + p
  return (x1 - a) + P.T @ (x2 - c[1])


def upper_objective(levels, method, inner_steps, inner_lr=0.8, seed=0):
  """``F(x_1)`` by nested argmin, each level with ``method`` (or ``method[k - 2]`` for
  level k when a sequence)."""
  A, c, D, a = chain(levels, seed)
  methods = method if isinstance(method, list) else [method] * (levels - 1)

  def best_response(k, x_prev):
    if k == levels:
      g = lambda x_prev, x: 0.5 * jnp.sum((x - A[k] @ x_prev) ** 2) + 0.5 * x @ D @ x
    else:

      def g(x_prev, x, k=k):
        below = best_response(k + 1, x)
        return 0.5 * jnp.sum((x - A[k] @ x_prev) ** 2) + 0.5 * jnp.sum((below - c[k]) ** 2)

    return bilevel.argmin(
      g, x_prev, jnp.zeros(DIM), method=methods[k - 2], inner_steps=inner_steps, inner_lr="auto"
    )

  return lambda x1: 0.5 * jnp.sum((x1 - a) ** 2) + 0.5 * jnp.sum((best_response(2, x1) - c[1]) ** 2)


METHODS = {
  "cg": bilevel.CG(DIM),
  # every level's Hessian has eigenvalues in [1, 1.7]: steps 0.8 (descent, Neumann) and 0.5
  # (ApproxGrad, stable below 2/λ_max²) converge at a rate of at most 0.4 per step
  "neumann": bilevel.Neumann(25, 0.8),
  "approxgrad": bilevel.ApproxGrad(40, 0.5),
  "rmd": bilevel.RMD(),
  "fmd": bilevel.FMD(),
}


@pytest.mark.parametrize("levels", [3, 4])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_nested_argmin_gives_the_exact_multilevel_gradient(levels, name):
  x1 = jnp.array([0.3, -0.7, 1.1])
  F = upper_objective(levels, METHODS[name], inner_steps=20)
  grad = jax.jit(jax.grad(F))(x1)
  np.testing.assert_allclose(grad, closed_form_gradient(levels, np.asarray(x1)), rtol=1e-8)


def test_mixed_methods_across_levels_and_forward_mode():
  # level 2 by CG, level 3 by RMD; reverse and forward mode agree with the closed form
  x1 = jnp.array([0.3, -0.7, 1.1])
  # and step sizes from the curvature at every level ("auto": power iteration through the
  # nested argmin's own derivative)
  F = upper_objective(3, [bilevel.CG(DIM), bilevel.RMD()], inner_steps=30, inner_lr="auto")
  np.testing.assert_allclose(jax.grad(F)(x1), closed_form_gradient(3, np.asarray(x1)), rtol=1e-8)
  np.testing.assert_allclose(jax.jacfwd(F)(x1), closed_form_gradient(3, np.asarray(x1)), rtol=1e-8)
