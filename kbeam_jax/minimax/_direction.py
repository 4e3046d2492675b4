"""The leader's direction from K beams: values, ε-set, weights and certificate in one call.

Shared by the pure K-beam solver and its optax form, so the two compute the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kbeam_jax._tree import tree_norm
from kbeam_jax.minimax import _rules

PyTree = Any


class Direction(NamedTuple):
  """The leader's direction ``z`` (step along ``-z``) and what the beams say about it."""

  z: PyTree
  values: jax.Array  # (K,) f(u, v_k)
  best: jax.Array  # index of the best beam
  eps_set_size: jax.Array  # |R|
  certificate: jax.Array  # |min-norm element of co{z_k : k in R}|
  weights: jax.Array  # (K,) convex weights λ on R


def direction(
  f: Callable[..., jax.Array],
  rule: str,
  u: PyTree,
  beams: PyTree,
  epsilon: jax.Array,
  key: jax.Array,
  args: tuple[Any, ...],
  qp_iters: int,
) -> Direction:
  """Evaluates every beam in one vmap and forms the direction of ``rule``.

  Rule ``best`` differentiates at the best beam only (one gradient); the ε-rules
  differentiate at every beam in one vmap (K gradients) and mask the ε-set.
  """
  in_axes = (None, 0) + (None,) * len(args)
  if rule == "best":
    values = jax.vmap(f, in_axes=in_axes)(u, beams, *args)
    best = jnp.argmax(values)
    v_best = jax.tree.map(lambda x: x[best], beams)
    z = jax.grad(f)(u, v_best, *args)
    K = values.shape[0]
    weights = jax.nn.one_hot(best, K, dtype=values.dtype)
    del epsilon, key  # the best rule has no ε-set and no randomness
    certificate = tree_norm(z).astype(values.dtype)
    return Direction(
      z=z,
      values=values,
      best=best,
      eps_set_size=jnp.sum(_rules.epsilon_set(values, 0.0)).astype(jnp.int32),
      certificate=certificate,
      weights=weights,
    )

  values, zs = jax.vmap(jax.value_and_grad(f), in_axes=in_axes)(u, beams, *args)
  best = jnp.argmax(values)
  mask = _rules.epsilon_set(values, epsilon)
  gram = _rules.gram_matrix(zs).astype(values.dtype)
  min_norm = _rules.min_norm_weights(gram, mask, qp_iters)
  if rule == "min_norm":
    weights = min_norm
  elif rule == "kiwiel":
    weights = _rules.kiwiel_weights(gram, values, mask, qp_iters)
  else:  # random
    weights = _rules.random_weights(key, mask, values.dtype)
  return Direction(
    z=_rules.combine(weights, zs),
    values=values,
    best=best,
    eps_set_size=jnp.sum(mask).astype(jnp.int32),
    # |Σλz| from the combination itself: λᵀGλ cancels badly near zero.
    certificate=tree_norm(_rules.combine(min_norm, zs)).astype(values.dtype),
    weights=weights,
  )
