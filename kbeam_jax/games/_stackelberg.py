r"""The two-player general-sum Stackelberg leader (Fiez, Chasnov & Ratliff 2020).

The leader (player 0) minimizes ``L_0(u, v*(u))`` where ``v*(u) = argmin_v L_1(u, v)`` is
the follower's best response: it descends its total derivative
``∇_u L_0 - ∇²_uv L_1 (∇²_vv L_1)⁻¹ ∇_v L_0``, the follower re-solved by warm-started inner
steps every step. This is ``bilevel.solver`` in the game's signature: any hypergradient
method, any of ``bilevel.argmin``'s inner-loop keywords.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kbeam_jax._solver import Solver
from kbeam_jax._tree import tree_norm
from kbeam_jax.bilevel import _methods, _outer
from kbeam_jax.games._core import GameInfo, make_game


def stackelberg(
  leader_loss: Callable[..., jax.Array],
  follower_loss: Callable[..., jax.Array],
  leader_opt: Any,
  method: _methods.Method,
  **inner: Any,
) -> Solver:
  r"""A Stackelberg leader over a best-responding follower.

  Args:
    leader_loss: ``L_0(players, *args) -> scalar``, ``players = (u, v)``.
    follower_loss: ``L_1(players, *args) -> scalar``; the follower plays ``argmin_v``.
    leader_opt: the leader's optax optimizer.
    method: how the best response is differentiated (``bilevel.CG(10)``, ``RMD()``, ...).
    **inner: the inner solve, as in ``bilevel.argmin``: ``inner_steps``, ``inner_lr`` or
      ``inner``, ``tol``, ``solve``, ``project_v``, ``prox``, ``throw``.

  Returns:
    ``Solver(init, step)``: ``init(players)`` and ``step(state, *args) -> (state,
    GameInfo)``; ``state.players`` is ``(u, v)``, ``info.status`` the leader's
    ``bilevel.HypergradientInfo``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import bilevel, games
    >>> L0 = lambda p: (p[0] - 1.0) ** 2 + p[0] * p[1]  # the leader
    >>> L1 = lambda p: (p[1] - p[0]) ** 2  # the follower copies the leader: v* = u
    >>> solver = games.stackelberg(L0, L1, optax.sgd(0.1), bilevel.CG(5), inner_steps=20,
    ...                            inner_lr=0.25)
    >>> state, _ = kbeam_jax.run(solver.step, solver.init((jnp.array(0.0), jnp.array(0.0))), 200)
    >>> round(float(state.players[0]), 3)  # min (u - 1)² + u²: u = 1/2
    0.5

  References:
    Fiez, Chasnov & Ratliff, Implicit Learning Dynamics in Stackelberg Games, ICML 2020.
  """
  game = make_game([leader_loss, follower_loss])
  f = lambda u, v, *args: game.losses[0]((u, v), *args)
  g = lambda u, v, *args: game.losses[1]((u, v), *args)
  solver = _outer.solver(f, g, leader_opt, method, **inner)

  def init(players):
    u, v = game.check(players)
    return solver.init(jax.random.key(0), u, v)

  def step(state, *args):
    new, status = solver.step(state, *args)
    players = (state.u, new.v)  # the leader's point, the follower's best response to it
    dtype = status.value.dtype
    follower = game.losses[1](players, *args).astype(dtype)
    losses = jnp.stack([status.value, follower])
    grad_v = jax.grad(lambda v: game.losses[1]((state.u, v), *args))(new.v)
    norms = jnp.stack([status.grad_norm, tree_norm(grad_v).astype(dtype)])
    return new, GameInfo(losses, norms, status)

  return Solver(init, step)
