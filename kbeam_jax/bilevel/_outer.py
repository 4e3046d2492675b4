r"""The outer solver of ``min_u f(u, v*(u))`` by hypergradients, and its optax form's core.

Each step: the method's hypergradient at ``u`` through an inner solve warm-started at the
previous answer ``v`` (and, for the implicit methods, a linear solve warm-started at the
previous adjoint ``q``), then one step of the upper optimizer. The penalty method, which
computes no hypergradient, has its own ``Core`` (``_penalty.py``) and shares this loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kbeam_jax._checks import check_float_leaves, check_optimizer, checked_projection
from kbeam_jax._solver import Solver
from kbeam_jax._tree import PyTree
from kbeam_jax.bilevel import _argmin, _hypergradient, _methods

Projection = Callable[[PyTree], PyTree]


class BilevelState(NamedTuple):
  """State of ``bilevel.solver``: both levels, the upper optimizer's state, the linear
  solve's last answer ``adjoint`` (its warm start; ``None`` for the methods without one)
  and the step count."""

  u: PyTree
  v: PyTree
  upper_state: Any
  adjoint: Any
  count: jax.Array

  @property
  def players(self) -> tuple[PyTree, PyTree]:
    """``(u, v)``: the leader and the follower, as the game solvers name them."""
    return (self.u, self.v)


class Core(NamedTuple):
  """A direction for ``u`` and the state it keeps beside ``v`` (``aux``: the linear solve's
  warm start, or the penalty method's schedule), shared by the solvers and the transforms:
  ``init(u, v) -> aux``, ``direction(f, g, u, v, aux, args) -> (grad, v, aux, info)``."""

  init: Callable[[PyTree, PyTree], Any]
  direction: Callable[..., tuple[PyTree, PyTree, Any, Any]]


def hypergradient_core(method: Any, settings: _argmin.InnerSettings, throw: bool) -> Core:
  """Validates the settings once; the ``Core`` of ``method`` with them (``aux``: the
  adjoint)."""
  method, loop, lr = _argmin.make_loop(method, settings)

  def direction(f, g, u, v, adjoint, args):
    out, adjoint = _hypergradient.hypergradient_step(
      f, method, loop, throw, (g, lr), u, v, args, adjoint
    )
    return out.grad, out.v, adjoint, out.info

  return Core(lambda u, v: method.init_adjoint(v), direction)


def core_solver(f, g, upper, core: Core, project_u, state_type) -> Solver:
  """``Solver(init, step)`` over ``core``: each step its direction for ``u`` (which moves
  ``v`` too), then one step of ``upper`` (already checked) and ``project_u``; the states
  are ``state_type(u, v, upper_state, aux, count)``."""
  project_u = checked_projection(project_u, "u")

  def init(key: jax.Array, u: PyTree, v: PyTree):
    del key  # deterministic methods; the key keeps the API of every other solver
    check_float_leaves(u, "u")
    check_float_leaves(v, "v")
    return state_type(u, v, upper.init(u), core.init(u, v), jnp.zeros([], jnp.int32))

  def step(state, *args: Any):
    u, v, upper_state, aux, count = state
    grad, v, aux, info = core.direction(f, g, u, v, aux, args)
    updates, upper_state = upper.update(grad, upper_state, u)
    u = project_u(optax.apply_updates(u, updates))
    return state_type(u, v, upper_state, aux, optax.safe_increment(count)), info

  return Solver(init, step)


def solver(
  f: Callable[..., jax.Array],
  g: Callable[..., jax.Array],
  upper: optax.GradientTransformation,
  method: _methods.Method,
  *,
  inner_steps: int | None = None,
  inner_lr: Any = None,
  inner: optax.GradientTransformation | None = None,
  tol: float | None = None,
  solve: Callable[..., PyTree] | None = None,
  project_u: Projection | None = None,
  project_v: Projection | None = None,
  prox: Callable[..., PyTree] | None = None,
  throw: bool = False,
) -> Solver:
  r"""The outer solver of ``min_u f(u, v*(u))``, ``v*(u) = argmin_v g(u, v)``, by hypergradient.

  Each step: ``bilevel.hypergradient`` at ``u`` with the inner solve warm-started at the
  previous ``v`` (and the implicit methods' linear solve at the previous adjoint, so a
  tolerance-stopped ``CG`` needs fewer products as the outer loop settles), then one step
  of ``upper`` and ``project_u``. To restart the inner problem (fresh tasks in
  meta-learning) re-``init`` and keep the upper part:
  ``solver.init(key, state.u, v0)._replace(upper_state=state.upper_state, count=state.count)``.

  Args:
    f: upper objective ``f(u, v, *args) -> scalar``.
    g: lower objective ``g(u, v, *args) -> scalar``.
    upper: optax optimizer for ``u``.
    method: ``Naive()``, ``FMD()``, ``RMD(...)``, ``ApproxGrad(...)``, ``CG(...)``,
      ``Neumann(...)`` or your own ``bilevel.Implicit``.
    inner_steps, inner_lr, inner, tol, solve, project_v, prox, throw: the inner solve, as
      in ``bilevel.argmin`` (``solve`` gets the previous ``v`` as its ``v0``).
    project_u: optional projection of ``u`` after every step (same shapes and dtypes).

  Returns:
    ``Solver(init, step)``: ``init(key, u, v) -> BilevelState`` (the key is unused: the
    methods are deterministic) and ``step(state, *args) -> (BilevelState,
    HypergradientInfo)``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum(u ** 2) + jnp.sum(v ** 2)
    >>> g = lambda u, v: jnp.sum((1.0 - u - v) ** 2)  # solution u = v = 0.5
    >>> solver = bilevel.solver(f, g, optax.sgd(0.01), bilevel.CG(10), inner_steps=5,
    ...                         inner_lr=0.1)
    >>> state = solver.init(jax.random.key(0), jnp.zeros(2), jnp.zeros(2))
    >>> state, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 3000))(state)
    >>> jnp.round(state.u, 2), bool(info.diverging.any())
    (Array([0.5, 0.5], dtype=float32), False)
  """
  upper = check_optimizer("upper", upper)
  settings = _argmin.InnerSettings(solve, inner_steps, inner_lr, inner, tol, project_v, prox)
  core = hypergradient_core(method, settings, throw)
  return core_solver(f, g, upper, core, project_u, BilevelState)
