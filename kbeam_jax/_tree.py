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


def tree_vdot(x: PyTree, y: PyTree) -> jax.Array:
  """``<x, y>`` over all leaves of two pytrees of one structure."""
  return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True))


def tree_axpy(a: Any, x: PyTree, y: PyTree) -> PyTree:
  """``a·x + y`` leaf by leaf, in the dtype of ``y``."""
  return jax.tree.map(lambda xi, yi: (a * xi + yi).astype(yi.dtype), x, y)


def tree_all_finite(tree: PyTree) -> jax.Array:
  """Whether every entry of every leaf is finite (a scalar bool)."""
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
