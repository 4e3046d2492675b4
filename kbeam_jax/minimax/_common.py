"""Pieces shared by the minimax solvers and transforms: a player's optax step and the
vmapped ascent of the beams."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kbeam_jax._checks import check_nonnegative

PyTree = Any
Projection = Callable[[PyTree], PyTree] | None


def descend(
  optimizer: optax.GradientTransformation,
  grads: PyTree,
  opt_state: Any,
  params: PyTree,
  project: Callable[[PyTree], PyTree],
) -> tuple[PyTree, Any]:
  """One optimizer step downhill on ``grads`` followed by the projection."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return project(optax.apply_updates(params, updates)), opt_state


def ascend(
  optimizer: optax.GradientTransformation,
  grads: PyTree,
  opt_state: Any,
  params: PyTree,
  project: Callable[[PyTree], PyTree],
) -> tuple[PyTree, Any]:
  """One optimizer step uphill: the optimizer sees the negated gradient."""
  return descend(optimizer, jax.tree.map(jnp.negative, grads), opt_state, params, project)


def ascend_beams(
  f: Callable[..., jax.Array],
  follower: optax.GradientTransformation,
  project_v: Callable[[PyTree], PyTree],
  num_ascent: int,
  u: PyTree,
  beams: PyTree,
  follower_state: Any,
  args: tuple[Any, ...],
  first_grads: PyTree | None = None,
) -> tuple[PyTree, Any]:
  """``num_ascent`` ascent steps of every beam at a fixed ``u``, all beams in one vmap.

  ``first_grads``: the beams' gradients ``∇_v f(u, v_k)`` at this ``u``, already
  computed (by the ``kiwiel`` line search); the first ascent step then uses them.
  """
  grad_v = jax.grad(f, argnums=1)

  def one_beam(v, opt_state, g0):
    def body(_, carry):
      v, opt_state = carry
      return ascend(follower, grad_v(u, v, *args), opt_state, v, project_v)

    if g0 is not None:
      v, opt_state = ascend(follower, g0, opt_state, v, project_v)
      if num_ascent == 1:
        return v, opt_state
      return jax.lax.fori_loop(1, num_ascent, body, (v, opt_state))
    if num_ascent == 1:  # no loop: the same program as one alternating-GDA ascent step
      return body(0, (v, opt_state))
    return jax.lax.fori_loop(0, num_ascent, body, (v, opt_state))

  return jax.vmap(one_beam)(beams, follower_state, first_grads)


def resolve_epsilon(epsilon: float | Callable[[jax.Array], jax.Array], count: jax.Array):
  """``epsilon`` as a scalar at step ``count`` (a constant or an optax-style schedule)."""
  return epsilon(count) if callable(epsilon) else jnp.asarray(epsilon)


def check_epsilon(epsilon: Any) -> None:
  if not callable(epsilon):
    check_nonnegative("epsilon", epsilon)


def check_num_ascent(num_ascent: Any) -> int:
  if isinstance(num_ascent, bool) or not isinstance(num_ascent, int | np.integer) or num_ascent < 1:
    raise ValueError(
      f"num_ascent (J, ascent steps per iteration) must be an int >= 1, got {num_ascent!r}."
    )
  return num_ascent


def active_mask(K: int, num_active: Any = None) -> jax.Array:
  """``(K,)`` booleans, True for the first ``num_active`` beams (all when None).

  ``num_active`` may be a traced integer: one compiled program then serves every beam
  count from 1 to K.
  """
  if num_active is None:
    return jnp.ones((K,), bool)
  if not isinstance(num_active, jax.core.Tracer):
    n = np.asarray(num_active)
    if isinstance(num_active, bool) or n.ndim or n.dtype.kind not in "iu" or not 1 <= n <= K:
      raise ValueError(
        f"num_active (the beams in use) must be an int from 1 to K={K}, got {num_active!r}."
      )
  return jnp.arange(K) < num_active


def keep_inactive(active: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """``new`` for the active beams, ``old`` for the others (leaves stacked on axis K)."""
  return jax.tree.map(
    lambda n, o: jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old
  )


def tree_where(cond: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """``new`` where the scalar ``cond`` holds, else ``old``, leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)


def tree_all_finite(tree: PyTree) -> jax.Array:
  """Whether every entry of every floating-point leaf is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True
