"""The tables the parametrized tests run over: every solver and every transform."""

import functools

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


def rules(epsilon: float) -> dict[str, minimax.Rule]:
  """One value of every K-beam rule by name, the ε-rules at ``epsilon``."""
  return {
    "best": minimax.Best(),
    "random": minimax.Random(epsilon),
    "min_norm": minimax.MinNorm(epsilon),
    "kiwiel": minimax.Kiwiel(epsilon),
  }


RULE_NAMES = tuple(rules(0.0))


def _kbeam(rule):
  return lambda f: minimax.kbeam(f, optax.sgd(0.2), optax.sgd(0.2), rule=rule)


SOLVERS = {
  **{f"kbeam_{name}": (_kbeam(rule), True) for name, rule in rules(0.05).items()},
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
  return lambda beams: optax.chain(
    minimax.scale_by_kbeam(optax.sgd(0.2), beams, rule=rule), optax.sgd(0.2)
  )


TRANSFORMS = {
  **{f"scale_by_kbeam_{name}": _transform(rule) for name, rule in rules(0.05).items()},
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


def hypergradient_forms(method):
  """``(solver factory, transform factory)`` of a hypergradient method."""
  return (
    functools.partial(bilevel.solver, method=method),
    functools.partial(bilevel.scale_by_hypergradient, method),
  )


def penalty_forms(**options):
  """``(solver factory, transform factory)`` of the penalty method with ``options``."""
  return (
    functools.partial(bilevel.penalty, **options),
    functools.partial(bilevel.scale_by_penalty, **options),
  )


# name -> (solver and transform factories, inner-loop settings, upper step): every method
# with settings at which it reaches the solution of (upper, lower) (the naive baseline
# reaches u = 0 instead).
BILEVEL_METHODS = {
  "naive": (hypergradient_forms(bilevel.Naive()), dict(inner_steps=5, inner_lr=0.9), 0.3),
  "fmd": (hypergradient_forms(bilevel.FMD()), dict(inner_steps=5, inner_lr=0.9), 0.3),
  "rmd": (hypergradient_forms(bilevel.RMD()), dict(inner_steps=5, inner_lr=0.9), 0.3),
  "rmd_checkpoint": (
    hypergradient_forms(bilevel.RMD(checkpoint=True)),
    dict(inner_steps=5, inner_lr=0.9),
    0.3,
  ),
  "approxgrad": (
    hypergradient_forms(bilevel.ApproxGrad(10, 0.9)),
    dict(inner_steps=5, inner_lr=0.9),
    0.3,
  ),
  "cg": (hypergradient_forms(bilevel.CG(5)), dict(inner_steps=5, inner_lr=0.9), 0.3),
  "neumann": (
    hypergradient_forms(bilevel.Neumann(10, 0.9)),
    dict(inner_steps=5, inner_lr=0.9),
    0.3,
  ),
  "penalty": (
    penalty_forms(max_gamma=10.0, augmented=True),
    dict(inner_steps=5, inner_lr=0.1),
    0.1,
  ),
}


def bilevel_solver(name):
  (solver, _), inner, lr = BILEVEL_METHODS[name]
  return solver(upper, lower, optax.sgd(lr), **inner)


def bilevel_transform(name, v):
  """The optax form of ``bilevel_solver(name)``, chained with the same upper step."""
  (_, transform), inner, lr = BILEVEL_METHODS[name]
  return optax.chain(transform(v, **inner), optax.sgd(lr))
