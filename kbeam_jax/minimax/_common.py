"""Pieces shared by the minimax solvers and transforms: a player's optax step and the
vmapped ascent of the beams."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kbeam_jax._tree import PyTree

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
  ascent_steps: int,
  u: PyTree,
  beams: PyTree,
  follower_state: Any,
  args: tuple[Any, ...],
  first_grads: PyTree | None = None,
) -> tuple[PyTree, Any]:
  """``ascent_steps`` ascent steps of every beam at a fixed ``u``, all beams in one vmap.

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
      if ascent_steps == 1:
        return v, opt_state
      return jax.lax.fori_loop(1, ascent_steps, body, (v, opt_state))
    if ascent_steps == 1:  # no loop: the same program as one alternating-GDA ascent step
      return body(0, (v, opt_state))
    return jax.lax.fori_loop(0, ascent_steps, body, (v, opt_state))

  return jax.vmap(one_beam)(beams, follower_state, first_grads)


def check_ascent_steps(ascent_steps: Any) -> int:
  bad = isinstance(ascent_steps, bool) or not isinstance(ascent_steps, int | np.integer)
  if bad or ascent_steps < 1:
    raise ValueError(
      f"ascent_steps (J, ascent steps per iteration) must be an int >= 1, got {ascent_steps!r}."
    )
  return int(ascent_steps)


_OLD_KEYWORDS = {
  "epsilon": "rule=minimax.MinNorm(epsilon) (or Random(ε), Kiwiel(ε))",
  "num_ascent": "ascent_steps=",
  "armijo": "rule=minimax.Kiwiel(epsilon, armijo=...)",
  "backtrack": "rule=minimax.Kiwiel(epsilon, backtrack=...)",
  "max_backtracks": "rule=minimax.Kiwiel(epsilon, max_backtracks=...)",
}


def reject_old_keywords(owner: str, extra: dict[str, Any]) -> None:
  """A ``TypeError`` naming the current spelling of a pre-0.3 keyword (``epsilon=``,
  ``num_ascent=``, Kiwiel's options), or saying an unknown keyword is unknown."""
  for name in extra:
    fix = _OLD_KEYWORDS.get(name)
    if fix is None:
      raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}.")
    raise TypeError(f"{owner}() no longer takes {name}=; pass {fix}.")


def active_mask(K: int, num_active: Any = None) -> jax.Array:
  """``(K,)`` booleans, True for the first ``num_active`` beams (all when None).

  ``num_active`` may be a traced integer: one compiled program then serves every beam
  count from 1 to K.
  """
  if num_active is None:
    return jnp.ones((K,), bool)
  if isinstance(num_active, jax.core.Tracer):  # checked when the program runs
    jax.debug.callback(functools.partial(_check_num_active, K), num_active)
  else:
    n = np.asarray(num_active)
    if isinstance(num_active, bool) or n.ndim or n.dtype.kind not in "iu" or not 1 <= n <= K:
      raise ValueError(
        f"num_active (the beams in use) must be an int from 1 to K={K}, got {num_active!r}."
      )
  return jnp.arange(K) < num_active


def _check_num_active(K: int, num_active: Any) -> None:
  n = np.asarray(num_active)
  if np.any((n < 1) | (n > K)):
    raise ValueError(
      f"num_active (the beams in use) must be from 1 to K={K}, got {n.tolist()} at run "
      "time; pass a smaller num_active, or stack more beams."
    )


def keep_inactive(active: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """``new`` for the active beams, ``old`` for the others (leaves stacked on axis K)."""
  return jax.tree.map(
    lambda n, o: jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old
  )


def tree_where(cond: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """``new`` where the scalar ``cond`` holds, else ``old``, leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)
