"""Small pytree arithmetic shared by the solvers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def tree_sq_norm(tree: PyTree) -> jax.Array:
  """``|x|²`` over all leaves of a pytree together."""
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def tree_norm(tree: PyTree) -> jax.Array:
  """Euclidean norm of all leaves of a pytree together."""
  return jnp.sqrt(tree_sq_norm(tree))


def tree_scaled_norm(tree: PyTree) -> jax.Array:
  """``|x|`` without overflow: ``m·|x/m|``, ``m`` the largest magnitude (float32 at least).

  ``tree_norm`` of a float32 vector with entries near 1e20 is ``inf``; this one is finite
  wherever the entries are."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
  top = jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(dtype) for x in leaves]))
  m = jnp.where(jnp.isfinite(top) & (top > 0), top, 1.0)
  return jnp.where(
    jnp.isfinite(top), m * tree_norm(jax.tree.map(lambda x: x.astype(dtype) / m, tree)), top
  )


def tree_vdot(x: PyTree, y: PyTree) -> jax.Array:
  """``<x, y>`` over all leaves of two pytrees of one structure."""
  return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True))


def tree_axpy(a: Any, x: PyTree, y: PyTree) -> PyTree:
  """``a·x + y`` leaf by leaf, in the dtype of ``y``."""
  return jax.tree.map(lambda xi, yi: (a * xi + yi).astype(yi.dtype), x, y)


def tree_all_finite(tree: PyTree) -> jax.Array:
  """Whether every entry of every leaf is finite (a scalar bool)."""
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def tree_random_like(tree: PyTree, seed: int = 0) -> PyTree:
  """A fixed pseudo-random normal pytree shaped like ``tree`` (a deterministic start)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
  return treedef.unflatten(
    [
      jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
      for k, x in zip(keys[: len(leaves)], leaves, strict=True)
    ]
  )
