"""Gradient descent-ascent baselines in the solver API of ``kbeam``.

* ``simultaneous_gda``  both players step from the same point;
* ``alternating_gda``   the leader steps, then the follower at the new leader (or the
  other order, ``order="max_first"``);
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

from kbeam_jax._checks import (
  check_float_leaves,
  check_optimizer,
  checked_projection,
  scalar_output,
)
from kbeam_jax._solver import Solver
from kbeam_jax._tree import PyTree, tree_all_finite, tree_norm
from kbeam_jax.minimax import _common


class GDAState(NamedTuple):
  """State of a GDA solver: one leader ``u`` and one follower ``v``."""

  u: PyTree
  v: PyTree
  leader_state: Any
  follower_state: Any
  count: jax.Array


class GDAInfo(NamedTuple):
  """``f(u, v)`` and the norms of both partial gradients at the step's starting point;
  ``update_finite`` is False when the step gave a non-finite ``u`` or ``v``, which was
  then skipped (both players and their optimizer states keep their values)."""

  value: jax.Array
  grad_u_norm: jax.Array
  grad_v_norm: jax.Array
  update_finite: jax.Array


class _Players(NamedTuple):
  """The objective, both optimizers and projections: what every GDA update reads."""

  f: Callable[..., jax.Array]
  leader: optax.GradientTransformation
  follower: optax.GradientTransformation
  project_u: Callable[[PyTree], PyTree]
  project_v: Callable[[PyTree], PyTree]

  def descend(self, grads: PyTree, state: GDAState) -> tuple[PyTree, Any]:
    return _common.descend(self.leader, grads, state.leader_state, state.u, self.project_u)

  def ascend(self, grads: PyTree, state: GDAState) -> tuple[PyTree, Any]:
    return _common.ascend(self.follower, grads, state.follower_state, state.v, self.project_v)


# The GDA updates: ``update(players, state, args) -> ((u, v, leader_state, follower_state),
# (value, grad_u, grad_v))``, the value and gradients at the step's starting point.


def _simultaneous(p: _Players, state: GDAState, args: tuple) -> tuple:
  value, (gu, gv) = jax.value_and_grad(p.f, argnums=(0, 1))(state.u, state.v, *args)
  (u, ls), (v, fs) = p.descend(gu, state), p.ascend(gv, state)
  return (u, v, ls, fs), (value, gu, gv)


def _at_start(p: _Players, state: GDAState, args: tuple) -> tuple:
  """``f`` and both partial gradients at the start by separate calls, in the order of
  kbeam's step with K = 1 (so that alternating GDA matches it step for step)."""
  value = p.f(state.u, state.v, *args)
  gu = jax.grad(p.f)(state.u, state.v, *args)
  return value, gu, jax.grad(p.f, argnums=1)(state.u, state.v, *args)


def _alternating(p: _Players, state: GDAState, args: tuple) -> tuple:
  value, gu, gv = _at_start(p, state, args)
  u, ls = p.descend(gu, state)
  v, fs = p.ascend(jax.grad(p.f, argnums=1)(u, state.v, *args), state)
  return (u, v, ls, fs), (value, gu, gv)


def _alternating_max_first(p: _Players, state: GDAState, args: tuple) -> tuple:
  value, gu, gv = _at_start(p, state, args)
  v, fs = p.ascend(gv, state)
  u, ls = p.descend(jax.grad(p.f)(state.u, v, *args), state)
  return (u, v, ls, fs), (value, gu, gv)


def _extragradient(p: _Players, state: GDAState, args: tuple) -> tuple:
  value, (gu, gv) = jax.value_and_grad(p.f, argnums=(0, 1))(state.u, state.v, *args)
  (u_half, _), (v_half, _) = p.descend(gu, state), p.ascend(gv, state)
  gu_half, gv_half = jax.grad(p.f, argnums=(0, 1))(u_half, v_half, *args)
  (u, ls), (v, fs) = p.descend(gu_half, state), p.ascend(gv_half, state)
  return (u, v, ls, fs), (value, gu, gv)


def _gda(
  f: Callable[..., jax.Array],
  leader: optax.GradientTransformation,
  follower: optax.GradientTransformation,
  project_u: Callable[[PyTree], PyTree] | None,
  project_v: Callable[[PyTree], PyTree] | None,
  update: Callable[[_Players, GDAState, tuple], tuple],
) -> Solver:
  """A GDA solver stepping by ``update`` (one of the updates above)."""
  check_optimizer("leader", leader)
  check_optimizer("follower", follower)
  f = scalar_output(f, "the objective f(u, v)")
  players = _Players(
    f, leader, follower, checked_projection(project_u, "u"), checked_projection(project_v, "v")
  )

  def init(key: jax.Array, u: PyTree, v: PyTree) -> GDAState:
    del key  # the baselines are deterministic; the key keeps the API of kbeam
    check_float_leaves(u, "u")
    check_float_leaves(v, "v")
    return GDAState(u, v, leader.init(u), follower.init(v), jnp.zeros([], jnp.int32))

  def step(state: GDAState, *args: Any) -> tuple[GDAState, GDAInfo]:
    new, (value, gu, gv) = update(players, state, args)
    finite = tree_all_finite(new[:2])
    old = (state.u, state.v, state.leader_state, state.follower_state)
    u, v, ls, fs = _common.tree_where(finite, new, old)
    norm = lambda g: tree_norm(g).astype(value.dtype)
    info = GDAInfo(value, norm(gu), norm(gv), finite)
    return GDAState(u, v, ls, fs, state.count + 1), info

  return Solver(init, step)


def simultaneous_gda(
  f: Callable[..., jax.Array],
  leader: optax.GradientTransformation,
  follower: optax.GradientTransformation,
  *,
  project_u: Callable[[PyTree], PyTree] | None = None,
  project_v: Callable[[PyTree], PyTree] | None = None,
) -> Solver:
  """Simultaneous gradient descent-ascent: both players step from the same point.

  ``u ← u - ρ ∇_u f(u, v)``, ``v ← v + η ∇_v f(u, v)`` (with any optax optimizers).

  Args:
    f: objective ``f(u, v, *args) -> scalar``, minimized in ``u``, maximized in ``v``.
    leader: optax optimizer for ``u``.
    follower: optax optimizer for ``v`` (it receives ``-∇_v f``, so it ascends).
    project_u: optional projection applied to ``u`` after every step.
    project_v: optional projection applied to ``v`` after every step.

  Returns:
    ``Solver(init, step)``: ``init(key, u, v) -> GDAState`` (the key is unused;
    it keeps the signature of ``kbeam``), ``step(state, *args) -> (GDAState, GDAInfo)``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import minimax
    >>> f = lambda u, v: 5 * (u ** 2 - v ** 2)  # saddle at (0, 0)
    >>> solver = minimax.simultaneous_gda(f, optax.sgd(0.02), optax.sgd(0.02))
    >>> state = solver.init(jax.random.key(0), jnp.array(0.4), jnp.array(-0.3))
    >>> state, _ = kbeam_jax.run(solver.step, state, 200)
    >>> bool(abs(state.u) < 1e-3 and abs(state.v) < 1e-3)
    True

  References:
    Arrow, Hurwicz & Uzawa, Studies in Linear and Non-linear Programming, 1958.
  """
  return _gda(f, leader, follower, project_u, project_v, _simultaneous)


def alternating_gda(
  f: Callable[..., jax.Array],
  leader: optax.GradientTransformation,
  follower: optax.GradientTransformation,
  *,
  project_u: Callable[[PyTree], PyTree] | None = None,
  project_v: Callable[[PyTree], PyTree] | None = None,
  order: str = "min_first",
) -> Solver:
  """Alternating gradient descent-ascent: one player steps, then the other at its new point.

  ``order="min_first"`` (default): ``u ← u - ρ ∇_u f(u, v)``, then
  ``v ← v + η ∇_v f(u_new, v)``, the same steps as ``kbeam`` with K = 1 and
  ``ascent_steps=1``. ``order="max_first"``: ``v ← v + η ∇_v f(u, v)``, then
  ``u ← u - ρ ∇_u f(u, v_new)`` (the order of the K-beam paper's own 2D code). Other
  arguments and the return value as in ``simultaneous_gda``; ``info`` is measured at the
  step's starting point in both orders.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import minimax
    >>> f = lambda u, v: 5 * (u ** 2 - v ** 2)
    >>> solver = minimax.alternating_gda(f, optax.sgd(0.02), optax.sgd(0.02))
    >>> state = solver.init(jax.random.key(0), jnp.array(0.4), jnp.array(-0.3))
    >>> state, _ = kbeam_jax.run(solver.step, state, 200)
    >>> bool(abs(state.u) < 1e-3 and abs(state.v) < 1e-3)
    True
  """
  if order not in ("min_first", "max_first"):
    raise ValueError(f"order must be 'min_first' or 'max_first', got order={order!r}.")
  update = _alternating if order == "min_first" else _alternating_max_first
  return _gda(f, leader, follower, project_u, project_v, update)


def optimistic_gda(
  f: Callable[..., jax.Array],
  leader: optax.GradientTransformation,
  follower: optax.GradientTransformation,
  *,
  alpha: float = 1.0,
  beta: float = 1.0,
  project_u: Callable[[PyTree], PyTree] | None = None,
  project_v: Callable[[PyTree], PyTree] | None = None,
) -> Solver:
  """Optimistic gradient descent-ascent: simultaneous steps on ``α g_t + β (g_t - g_{t-1})``.

  Built from ``optax.scale_by_optimistic_gradient(alpha, beta)`` chained before each
  player's optimizer. Other arguments and the return value as in ``simultaneous_gda``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import minimax
    >>> solver = minimax.optimistic_gda(lambda u, v: u * v, optax.sgd(0.2), optax.sgd(0.2))
    >>> state = solver.init(jax.random.key(0), jnp.array(0.4), jnp.array(-0.3))
    >>> state, _ = kbeam_jax.run(solver.step, state, 2000)  # plain GDA spirals out here
    >>> bool(abs(state.u) < 1e-3 and abs(state.v) < 1e-3)
    True

  References:
    Daskalakis, Ilyas, Syrgkanis & Zeng, Training GANs with Optimism, ICLR 2018.
  """
  leader = optax.chain(optax.scale_by_optimistic_gradient(alpha, beta), leader)
  follower = optax.chain(optax.scale_by_optimistic_gradient(alpha, beta), follower)
  return _gda(f, leader, follower, project_u, project_v, _simultaneous)


def extragradient(
  f: Callable[..., jax.Array],
  leader: optax.GradientTransformation,
  follower: optax.GradientTransformation,
  *,
  project_u: Callable[[PyTree], PyTree] | None = None,
  project_v: Callable[[PyTree], PyTree] | None = None,
) -> Solver:
  """Extragradient: look ahead one step, then step from the start with the look-ahead gradients.

  ``(u', v') = (u - ρ∇_u f(u, v), v + η∇_v f(u, v))``, then
  ``(u, v) ← (u - ρ∇_u f(u', v'), v + η∇_v f(u', v'))``. The look-ahead step's optimizer
  state is discarded; the real step updates it. Arguments and return value as in
  ``simultaneous_gda``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import minimax
    >>> solver = minimax.extragradient(lambda u, v: u * v, optax.sgd(0.2), optax.sgd(0.2))
    >>> state = solver.init(jax.random.key(0), jnp.array(0.4), jnp.array(-0.3))
    >>> state, _ = kbeam_jax.run(solver.step, state, 2000)
    >>> bool(abs(state.u) < 1e-3 and abs(state.v) < 1e-3)
    True

  References:
    Korpelevich, The extragradient method for finding saddle points, 1976.
  """
  return _gda(f, leader, follower, project_u, project_v, _extragradient)
