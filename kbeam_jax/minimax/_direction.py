"""The leader's direction from K beams: values, ε-set, weights and certificate in one call.

Shared by the pure K-beam solver and its optax form, so the two compute the same step.

Which beams count: a beam takes part only if it is active (``active``, the runtime mask
that lets one compiled program serve every K up to the number of stacked beams) and its
value ``f(u, v_k)`` is finite (for the ε-rules its gradient ``∇_u f(u, v_k)`` too). Other
beams never enter the best beam, the ε-set, the weights or the certificate; the active
ones left out for a non-finite value or gradient are counted in ``num_nonfinite``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kbeam_jax._tree import PyTree
from kbeam_jax.minimax import _rules


class Direction(NamedTuple):
  """The leader's direction ``z`` (step along ``-z``) and what the beams say about it."""

  z: PyTree
  values: jax.Array  # (K,) f(u, v_k)
  best: jax.Array  # index of the best valid beam
  eps_set_size: jax.Array  # |R|
  certificate: jax.Array  # see KBeamInfo; NaN when no beam was valid
  weights: jax.Array  # (K,) convex weights λ on R
  num_nonfinite: jax.Array  # active beams left out for a non-finite value or gradient
  valid: jax.Array  # (K,) the beams that took part: active, finite value (and gradient)
  any_valid: jax.Array  # some beam was valid (else z = 0)


def _norm(tree: PyTree) -> jax.Array:
  """Euclidean norm over all leaves, accumulated in at least float32."""
  leaves = jax.tree.leaves(tree)
  work = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(work))) for x in leaves))


def _per_beam_finite(zs: PyTree) -> jax.Array:
  """``(K,)``: every entry of beam k's gradient is finite."""
  leaves = jax.tree.leaves(zs)
  K = leaves[0].shape[0]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x.reshape(K, -1)), axis=1) for x in leaves]), 0)


def _select(mask: jax.Array, zs: PyTree) -> PyTree:
  """Zeroes the gradients of the beams off ``mask`` (NaN included)."""
  return jax.tree.map(
    lambda x: jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x)), zs
  )


def _local(fn: Callable[..., Any], sharded_beams: bool) -> Callable[..., Any]:
  """With sharded beams under a mesh context: ``fn`` runs whole on every device on
  replicated inputs (a ``shard_map``), so the K-sized simplex problem's loop has no
  collectives; XLA's partitioner would otherwise split its K-vectors across devices."""
  mesh = jax.sharding.get_abstract_mesh()
  if not sharded_beams or mesh.empty:
    return fn
  spec = jax.sharding.PartitionSpec()
  return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


def _certificate(gram, zs, mask, qp_steps, dtype, sharded_beams):
  """``|min-norm element of co{z_k : k in mask}|`` and its weights; NaN for an empty mask."""
  solve = lambda gram, mask: _rules.min_norm_weights(gram, mask, qp_steps)
  weights = _local(solve, sharded_beams)(gram, mask)
  cert = jnp.where(jnp.any(mask), _norm(_rules.combine(weights, zs)), jnp.nan)
  return cert.astype(dtype), weights


def direction(
  f: Callable[..., jax.Array],
  rule: _rules.Rule,
  u: PyTree,
  beams: PyTree,
  active: jax.Array,
  epsilon: jax.Array,
  key: jax.Array,
  args: tuple[Any, ...],
  qp_steps: int | None,
  *,
  certificate_epsilon: float | None = None,
  sharded_beams: bool = False,
) -> Direction:
  """Evaluates every beam in one vmap and forms the direction of ``rule`` (a rule value).

  ``Best`` differentiates at the best beam only (one gradient), unless
  ``sharded_beams`` (then at every beam, combined with one-hot weights: no beam's
  parameters cross devices) or ``certificate_epsilon`` (the ε-certificate needs every
  gradient). The ε-rules differentiate at every beam in one vmap and mask the ε-set.
  """
  in_axes = (None, 0) + (None,) * len(args)
  all_grads = rule.all_gradients or sharded_beams or certificate_epsilon is not None
  if all_grads:
    values, zs = jax.vmap(jax.value_and_grad(f), in_axes=in_axes)(u, beams, *args)
  else:
    values = jax.vmap(f, in_axes=in_axes)(u, beams, *args)
  dtype = values.dtype
  finite = jnp.isfinite(values) & (_per_beam_finite(zs) if rule.all_gradients else True)
  valid = active & finite
  num_nonfinite = jnp.sum(active & ~finite).astype(jnp.int32)
  any_valid = jnp.any(valid)
  ranked = jnp.where(valid, values, -jnp.inf)
  best = jnp.argmax(ranked).astype(jnp.int32)
  K = values.shape[0]

  if not rule.all_gradients:  # the best beam's gradient alone (Best)
    weights = jax.nn.one_hot(best, K, dtype=dtype) * any_valid.astype(dtype)
    if all_grads:
      grads_finite = _per_beam_finite(zs)
      z = _rules.combine(weights, _select((jnp.arange(K) == best) & any_valid, zs))
    else:
      v_best = jax.tree.map(lambda x: x[best], beams)
      z = jax.tree.map(
        lambda g: jnp.where(any_valid, g, jnp.zeros_like(g)), jax.grad(f)(u, v_best, *args)
      )
    del key  # the best rule has no randomness
    if certificate_epsilon is None:
      certificate = jnp.where(any_valid, _norm(z), jnp.nan).astype(dtype)
    else:
      ok = valid & grads_finite
      mask = _rules.epsilon_set(values, certificate_epsilon, ok)
      zs = _select(ok, zs)
      gram = _rules.gram_matrix(zs)
      certificate, _ = _certificate(gram, zs, mask, qp_steps, dtype, sharded_beams)
    eps_set_size = jnp.sum(valid & (ranked == ranked[best])) * any_valid
    return Direction(
      z=z,
      values=values,
      best=best,
      eps_set_size=eps_set_size.astype(jnp.int32),
      certificate=certificate,
      weights=weights,
      num_nonfinite=num_nonfinite,
      valid=valid,
      any_valid=any_valid,
    )

  mask = _rules.epsilon_set(values, epsilon, valid)
  zs = _select(valid, zs)
  gram = _rules.gram_matrix(zs)
  certificate, min_norm = _certificate(gram, zs, mask, qp_steps, dtype, sharded_beams)
  solve = lambda fn, *xs: _local(fn, sharded_beams)(*xs)
  weights = rule.weights(values, gram, mask, key, min_norm, qp_steps, solve)
  weights = jnp.where(jnp.any(mask), weights, 0.0).astype(dtype)
  return Direction(
    z=_rules.combine(weights, zs),
    values=values,
    best=best,
    eps_set_size=jnp.sum(mask).astype(jnp.int32),
    # |Σλz| from the combination itself: λᵀGλ cancels badly near zero.
    certificate=certificate,
    weights=weights,
    num_nonfinite=num_nonfinite,
    valid=valid,
    any_valid=any_valid,
  )
