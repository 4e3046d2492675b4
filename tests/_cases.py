"""The tables the parametrized tests run over: every solver and every transform."""

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from kbeam_jax import bilevel, minimax

K = 3


def game(u, v, scale=1.0):
  """``½|u|² + scale·<u, v> - ½|v|²`` on dict/list pytrees of 3 numbers: saddle at 0."""
  uf, vf = ravel_pytree(u)[0], ravel_pytree(v)[0]
  return 0.5 * jnp.sum(uf**2) + scale * jnp.dot(uf, vf) - 0.5 * jnp.sum(vf**2)


def u0(dtype=jnp.float32):
  return {"w": jnp.array([0.4, -0.3], dtype), "b": [jnp.array(0.2, dtype)]}


def v0(dtype=jnp.float32):
  return [jnp.array([0.1, 0.25], dtype), {"c": jnp.array(-0.35, dtype)}]


def stacked_beams(dtype=jnp.float32):
  scales = jnp.linspace(-1.0, 1.0, K, dtype=dtype)
  return jax.tree.map(lambda x: scales.reshape((K,) + (1,) * x.ndim) * x[None], v0(dtype))


def _kbeam(rule):
  def make(f):
    return minimax.kbeam(
      f, optax.sgd(0.2), optax.sgd(0.2), rule=rule, epsilon=0.0 if rule == "best" else 0.05
    )

  return make


SOLVERS = {
  **{f"kbeam_{rule}": (_kbeam(rule), True) for rule in minimax.RULES},
  "simultaneous_gda": (
    lambda f: minimax.simultaneous_gda(f, optax.sgd(0.2), optax.sgd(0.2)),
    False,
  ),
  "alternating_gda": (lambda f: minimax.alternating_gda(f, optax.sgd(0.2), optax.sgd(0.2)), False),
  "optimistic_gda": (lambda f: minimax.optimistic_gda(f, optax.sgd(0.1), optax.sgd(0.1)), False),
  "extragradient": (lambda f: minimax.extragradient(f, optax.sgd(0.2), optax.sgd(0.2)), False),
}


def init_solver(name, f, dtype=jnp.float32):
  make, uses_beams = SOLVERS[name]
  solver = make(f)
  if uses_beams:
    return solver, solver.init(jax.random.key(0), u0(dtype), stacked_beams(dtype), K)
  return solver, solver.init(jax.random.key(0), u0(dtype), v0(dtype))


def _transform(rule):
  def make(beams):
    eps = 0.0 if rule == "best" else 0.05
    return optax.chain(
      minimax.scale_by_kbeam(optax.sgd(0.2), beams, rule=rule, epsilon=eps), optax.sgd(0.2)
    )

  return make


TRANSFORMS = {
  **{f"scale_by_kbeam_{rule}": _transform(rule) for rule in minimax.RULES},
  "kbeam_sgd": lambda beams: minimax.kbeam_sgd(0.2, optax.sgd(0.2), beams),
  "kbeam_adam": lambda beams: optax.chain(
    minimax.scale_by_kbeam(optax.adam(0.1), beams), optax.adam(0.02)
  ),
}


# --- bilevel: min_u f(u, v*(u)), the same dict/list pytrees ------------------------------
def upper(u, v, scale=1.0):
  """``½|u|² + ½|v - 1|²``."""
  uf, vf = ravel_pytree(u)[0], ravel_pytree(v)[0]
  return 0.5 * jnp.sum(uf**2) + 0.5 * jnp.sum((vf - 1.0) ** 2)


def lower(u, v, scale=1.0):
  """``½|v - scale·u|²``: ``v* = scale·u``, and the bilevel solution is
  ``u* = scale / (1 + scale²)`` in every coordinate (0.5, 0.5 at scale 1)."""
  uf, vf = ravel_pytree(u)[0], ravel_pytree(v)[0]
  return 0.5 * jnp.sum((vf - scale * uf) ** 2)


# name -> (method, inner-loop settings, upper step): every method with settings at which
# it reaches the solution of (upper, lower) (the naive baseline reaches u = 0 instead).
BILEVEL_METHODS = {
  "naive": (bilevel.Naive(), dict(num_steps=5, inner_lr=0.9), 0.3),
  "fmd": (bilevel.FMD(), dict(num_steps=5, inner_lr=0.9), 0.3),
  "rmd": (bilevel.RMD(), dict(num_steps=5, inner_lr=0.9), 0.3),
  "rmd_checkpoint": (bilevel.RMD(checkpoint=True), dict(num_steps=5, inner_lr=0.9), 0.3),
  "approxgrad": (bilevel.ApproxGrad(10, 0.9), dict(num_steps=5, inner_lr=0.9), 0.3),
  "cg": (bilevel.CG(5), dict(num_steps=5, inner_lr=0.9), 0.3),
  "neumann": (bilevel.Neumann(10, 0.9), dict(num_steps=5, inner_lr=0.9), 0.3),
  "penalty": (
    bilevel.Penalty(max_gamma=10.0, augmented=True),
    dict(num_steps=5, inner_lr=0.1),
    0.1,
  ),
}


def bilevel_solver(name):
  method, inner, lr = BILEVEL_METHODS[name]
  return bilevel.solver(upper, lower, optax.sgd(lr), method, **inner)


def bilevel_transform(name, v):
  """The optax form of ``bilevel_solver(name)``, chained with the same upper step."""
  method, inner, lr = BILEVEL_METHODS[name]
  return optax.chain(bilevel.scale_by_hypergradient(method, v, **inner), optax.sgd(lr))
