"""Gradient descent-ascent baselines in the solver API of ``kbeam``.

* ``simultaneous_gda``  both players step from the same point;
* ``alternating_gda``   the leader steps, then the follower at the new leader;
* ``optimistic_gda``    simultaneous steps on ``g_t + (g_t - g_{t-1})`` (optax's
  ``scale_by_optimistic_gradient`` chained before each player's optimizer);
* ``extragradient``     step to a look-ahead point, then step from the original point
  with the gradients of the look-ahead point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kbeam_jax._checks import check_float_leaves, scalar_output
from kbeam_jax.minimax import _common

PyTree = Any


class GDAState(NamedTuple):
  """State of a GDA solver: one leader ``u`` and one follower ``v``."""

  u: PyTree
  v: PyTree
  leader_state: Any
  follower_state: Any
  count: jax.Array


class GDAInfo(NamedTuple):
  """``f(u, v)`` and the norms of both partial gradients at the step's starting point."""

  value: jax.Array
  grad_u_norm: jax.Array
  grad_v_norm: jax.Array


def _norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _gda(
    f: Callable[..., jax.Array],
    leader: optax.GradientTransformation,
    follower: optax.GradientTransformation,
    project_u: Callable[[PyTree], PyTree] | None,
    project_v: Callable[[PyTree], PyTree] | None,
    mode: str,
) -> _common.MinimaxSolver:
  f = scalar_output(f, "the objective f(u, v)")
  project_u = project_u or _common.identity
  project_v = project_v or _common.identity
  value_and_grads = jax.value_and_grad(f, argnums=(0, 1))

  def init(key: jax.Array, u: PyTree, v: PyTree) -> GDAState:
    del key  # the baselines are deterministic; the key keeps the API of kbeam
    check_float_leaves(u, "u")
    check_float_leaves(v, "v")
    return GDAState(u, v, leader.init(u), follower.init(v), jnp.zeros([], jnp.int32))

  def simultaneous(state, args):
    value, (gu, gv) = value_and_grads(state.u, state.v, *args)
    u, ls = _common.descend(leader, gu, state.leader_state, state.u, project_u)
    v, fs = _common.ascend(follower, gv, state.follower_state, state.v, project_v)
    return (u, v, ls, fs), (value, gu, gv)

  def alternating(state, args):
    value, (gu, gv) = value_and_grads(state.u, state.v, *args)
    u, ls = _common.descend(leader, gu, state.leader_state, state.u, project_u)
    gv_new = jax.grad(f, argnums=1)(u, state.v, *args)
    v, fs = _common.ascend(follower, gv_new, state.follower_state, state.v, project_v)
    return (u, v, ls, fs), (value, gu, gv)

  def extragradient(state, args):
    value, (gu, gv) = value_and_grads(state.u, state.v, *args)
    u_half, _ = _common.descend(leader, gu, state.leader_state, state.u, project_u)
    v_half, _ = _common.ascend(follower, gv, state.follower_state, state.v, project_v)
    gu_half, gv_half = jax.grad(f, argnums=(0, 1))(u_half, v_half, *args)
    u, ls = _common.descend(leader, gu_half, state.leader_state, state.u, project_u)
    v, fs = _common.ascend(follower, gv_half, state.follower_state, state.v, project_v)
    return (u, v, ls, fs), (value, gu, gv)

  update = {"simultaneous": simultaneous, "alternating": alternating,
            "extragradient": extragradient}[mode]

  def step(state: GDAState, *args: Any) -> tuple[GDAState, GDAInfo]:
    (u, v, ls, fs), (value, gu, gv) = update(state, args)
    info = GDAInfo(value, _norm(gu).astype(value.dtype), _norm(gv).astype(value.dtype))
    return GDAState(u, v, ls, fs, state.count + 1), info

  return _common.MinimaxSolver(init, step)


_EXAMPLE = """
  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from kbeam_jax import minimax
    >>> f = lambda u, v: 5 * (u ** 2 - v ** 2)  # saddle at (0, 0)
    >>> solver = minimax.{name}(f, optax.sgd(0.02), optax.sgd(0.02))
    >>> state = solver.init(jax.random.key(0), jnp.array(0.4), jnp.array(-0.3))
    >>> state, _ = minimax.run(solver.step, state, 200)
    >>> bool(abs(state.u) < 1e-3 and abs(state.v) < 1e-3)
    True
"""

_ARGS = """
  Args:
    f: objective ``f(u, v, *args) -> scalar``, minimized in ``u`` and maximized in ``v``.
    leader: optax optimizer for ``u``.
    follower: optax optimizer for ``v`` (it receives ``-∇_v f``, so it ascends).
    project_u: optional projection applied to ``u`` after every step.
    project_v: optional projection applied to ``v`` after every step.

  Returns:
    ``MinimaxSolver(init, step)`` with ``init(key, u, v) -> GDAState`` (the key is
    unused; it keeps the signature of ``kbeam``) and
    ``step(state, *args) -> (GDAState, GDAInfo)``.
"""


def simultaneous_gda(f, leader, follower, *, project_u=None, project_v=None):
  return _gda(f, leader, follower, project_u, project_v, "simultaneous")


def alternating_gda(f, leader, follower, *, project_u=None, project_v=None):
  return _gda(f, leader, follower, project_u, project_v, "alternating")


def optimistic_gda(
    f, leader, follower, *, alpha=1.0, beta=1.0, project_u=None, project_v=None
):
  leader = optax.chain(optax.scale_by_optimistic_gradient(alpha, beta), leader)
  follower = optax.chain(optax.scale_by_optimistic_gradient(alpha, beta), follower)
  return _gda(f, leader, follower, project_u, project_v, "simultaneous")


def extragradient(f, leader, follower, *, project_u=None, project_v=None):
  return _gda(f, leader, follower, project_u, project_v, "extragradient")


simultaneous_gda.__doc__ = (
    "Simultaneous gradient descent-ascent: ``u ← u - ρ∇_u f(u, v)``, "
    "``v ← v + η∇_v f(u, v)``.\n" + _ARGS + _EXAMPLE.format(name="simultaneous_gda")
)
alternating_gda.__doc__ = (
    "Alternating gradient descent-ascent: ``u ← u - ρ∇_u f(u, v)``, then "
    "``v ← v + η∇_v f(u_new, v)``.\n\n  Equal to ``kbeam`` with K = 1 step for step.\n"
    + _ARGS + _EXAMPLE.format(name="alternating_gda")
)
optimistic_gda.__doc__ = (
    "Optimistic gradient descent-ascent: simultaneous steps on "
    "``α g_t + β (g_t - g_{t-1})``.\n\n  Built from ``optax.scale_by_optimistic_gradient`` "
    "chained before each player's optimizer.\n"
    + _ARGS.replace("    project_u:", "    alpha, beta: the optimism weights of optax's "
                    "``scale_by_optimistic_gradient``.\n    project_u:")
    + _EXAMPLE.format(name="optimistic_gda")
    + "\n  References:\n    Daskalakis et al., Training GANs with Optimism, ICLR 2018.\n"
)
extragradient.__doc__ = (
    "Extragradient: look ahead to ``(u - ρ∇_u f, v + η∇_v f)``, then step from "
    "``(u, v)`` with the look-ahead gradients.\n\n  The look-ahead step's optimizer state "
    "is discarded; the real step updates it.\n"
    + _ARGS + _EXAMPLE.format(name="extragradient")
    + "\n  References:\n    Korpelevich, The extragradient method for finding saddle "
    "points, 1976.\n"
)
