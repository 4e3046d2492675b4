"""The tables the bilevel tests run over: a random quadratic problem with a closed-form
hypergradient, and every method at settings where it has converged on it."""

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kbeam_jax import bilevel

LR = 0.25  # 1 / λ_max(A): the inner step of every test problem


def flat(tree):
  return ravel_pytree(tree)[0]


class Quadratic:
  """``g = ½vᵀAv + uᵀBv + cᵀv``, ``f = ½|u - a|² + ½vᵀCv + uᵀDv + eᵀv`` on pytrees.

  ``A`` has eigenvalues in [1, 4]; ``u`` is a dict of lists, ``v`` a list of dicts.
  """

  def __init__(self, seed, U=3, V=4):
    ks = jax.random.split(jax.random.key(seed), 8)
    Q = jnp.linalg.qr(jax.random.normal(ks[0], (V, V)))[0]
    self.A = Q @ jnp.diag(jnp.linspace(1.0, 4.0, V)) @ Q.T
    self.B = jax.random.normal(ks[1], (U, V))
    self.c = jax.random.normal(ks[2], (V,))
    M = jax.random.normal(ks[3], (V, V))
    self.C = M @ M.T / V
    self.D = jax.random.normal(ks[4], (U, V))
    self.a, self.e = jax.random.normal(ks[5], (U,)), jax.random.normal(ks[6], (V,))
    self.u = {"x": jax.random.normal(ks[7], (2,)), "y": [jnp.array([0.3])]}
    self.v0 = [jnp.zeros(2), {"z": jnp.zeros(2)}]

  def g(self, u, v):
    uf, vf = flat(u), flat(v)
    return 0.5 * vf @ self.A @ vf + uf @ self.B @ vf + self.c @ vf

  def f(self, u, v):
    uf, vf = flat(u), flat(v)
    return (
      0.5 * jnp.sum((uf - self.a) ** 2) + 0.5 * vf @ self.C @ vf + uf @ self.D @ vf + self.e @ vf
    )

  def v_star(self, u):
    return -jnp.linalg.solve(self.A, self.B.T @ flat(u) + self.c)

  def closed_form(self, u):
    """``∇_u f - ∇²_uv g (∇²_vv g)⁻¹ ∇_v f`` at ``v*(u)``."""
    uf, unravel = ravel_pytree(u)
    v = self.v_star(u)
    f_u = uf - self.a + self.D @ v
    f_v = self.C @ v + self.D.T @ uf + self.e
    return unravel(f_u - self.B @ jnp.linalg.solve(self.A, f_v))

  def unrolled_value(self, u, T, lr):
    """``f(u, v_T)`` with ``v_T`` from T plain descent steps (no derivative rule)."""
    v = bilevel.argmin(self.g, u, self.v0, method=bilevel.Naive(), inner_steps=T, inner_lr=lr)
    return self.f(u, v)


# Every method with settings at which it has converged on ``Quadratic`` (float64).
CONVERGED = {
  "fmd": (bilevel.FMD(), dict(inner_steps=300, inner_lr=LR)),
  "rmd": (bilevel.RMD(), dict(inner_steps=300, inner_lr=LR)),
  "rmd_checkpoint": (bilevel.RMD(checkpoint=True), dict(inner_steps=300, inner_lr=LR)),
  "approxgrad": (bilevel.ApproxGrad(800, 1 / 16), dict(inner_steps=300, inner_lr=LR)),
  "cg": (bilevel.CG(10), dict(inner_steps=300, inner_lr=LR)),
  "neumann": (bilevel.Neumann(300, LR), dict(inner_steps=300, inner_lr=LR)),
}
