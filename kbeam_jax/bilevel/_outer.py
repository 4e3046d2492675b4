r"""The one outer solver for ``min_u f(u, v*(u))`` and the penalty method inside it.

Every method reduces to one *direction* for ``u`` per step, computed by a core shared
with the optax transforms:

* a hypergradient method (``Naive``, ``FMD``, ``RMD``, ``ApproxGrad``, ``CG``,
  ``Neumann``) runs T inner steps on ``v`` from the previous ``v_T`` (a warm start) and
  differentiates through them (``hypergradient``);
* ``Penalty`` takes T steps of the inner optimizer on ``L_γ + λg`` in ``v`` (the state
  keeps that optimizer's state, γ, ε and ν between steps) and returns ``∇_u L_γ``:

    ``L_γ = f + νᵀ∇_v g + (γ/2)|∇_v g|²``, ``∇_u L = ∇_u f + ∇²_uv g (ν + γ∇_v g)``,
    ``∇_v L = ∇_v f + ∇²_vv g (ν + γ∇_v g)`` (one ``hvp_joint``).

  When ``|∇L|² < ε²`` there, γ, ε (and ν) tighten for the next step. When ``|∇_v g|``
  has risen for ``Penalty.divergence_steps`` steps in a row to above its value after the
  first step, or ``v`` is no longer finite, the info says ``diverging``: the penalized
  objective is unbounded at this γ (raise γ_0).

``solver`` adds the upper optimizer and the projections; ``scale_by_hypergradient`` is the
same core as an optax transform.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kbeam_jax import derivatives
from kbeam_jax._checks import check_float_leaves, checked_projection, scalar_output
from kbeam_jax._solver import Solver
from kbeam_jax._tree import tree_all_finite, tree_norm, tree_sq_norm
from kbeam_jax.bilevel import _argmin, _methods

PyTree = Any
Projection = Callable[[PyTree], PyTree]


class BilevelState(NamedTuple):
  """State of ``bilevel.solver``: both levels, the upper optimizer's state and, for the
  penalty method, its own state in ``lower`` (``()`` for the hypergradient methods)."""

  u: PyTree
  v: PyTree
  upper_state: Any
  lower: Any
  count: jax.Array


class HypergradientInfo(NamedTuple):
  """What a hypergradient step saw, at the ``u`` it started from.

  Attributes:
    value: ``f(u, v_T)``.
    grad_norm: ``|hypergradient|``.
    lower_grad_norm: ``|∇_v g(u, v_T)|``, how far the inner solve is from stationary.
    finite: the hypergradient is finite (False after a diverged inner solve: the step
      was still applied, so ``u`` is no longer finite either).
  """

  value: jax.Array
  grad_norm: jax.Array
  lower_grad_norm: jax.Array
  finite: jax.Array


class PenaltyLower(NamedTuple):
  """The penalty method's state beside ``u`` and ``v``; ``nu`` is zeros unless augmented."""

  opt_state: Any  # the inner optimizer's state for v
  gamma: jax.Array
  epsilon: jax.Array
  nu: PyTree
  increases: jax.Array  # times the schedule tightened
  rises: jax.Array  # consecutive steps in which |∇_v g| rose
  lower_grad_norm: jax.Array  # |∇_v g| after the last step
  first_lower_grad_norm: jax.Array  # |∇_v g| after the first step


class PenaltyInfo(NamedTuple):
  """What a penalty step saw, after its steps on ``v`` and before ``u`` moved.

  Attributes:
    value: ``f(u, v)``.
    grad_norm: ``|∇_u L_γ|``, the direction of ``u``.
    lower_grad_norm: ``|∇_v g(u, v)|``, the constraint violation.
    penalized_grad_sq: ``|∇L_γ|²`` in ``(u, v)``, compared with ``ε²``.
    gamma, epsilon: the schedule for the next step.
    increased: the schedule tightened at this step.
    diverging: ``|∇_v g|`` rose for ``divergence_steps`` steps in a row to above its value
      after the first step, or ``v`` is not finite: ``L_γ`` is unbounded at this γ. Raise
      γ_0 (``Penalty(gamma=...)``).
    finite: ``∇_u L_γ`` is finite.
  """

  value: jax.Array
  grad_norm: jax.Array
  lower_grad_norm: jax.Array
  penalized_grad_sq: jax.Array
  gamma: jax.Array
  epsilon: jax.Array
  increased: jax.Array
  diverging: jax.Array
  finite: jax.Array


class Core(NamedTuple):
  """A method's direction for ``u``, shared by the solver and the transform.

  ``init(u, v) -> lower`` and ``direction(f, g, u, v, lower, args) -> (grad_u, v, lower,
  info)``, ``grad_u`` in the dtypes of ``u``.
  """

  init: Callable[..., Any]
  direction: Callable[..., tuple[PyTree, PyTree, Any, Any]]


def like(grad: PyTree, u: PyTree) -> PyTree:
  return jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), grad, u)


def hypergradient_core(
  method: _methods.Method, inner: _argmin.Inner, project_v: Projection
) -> Core:
  def init(u, v):
    del u, v
    return ()

  def direction(f, g, u, v, lower, args):
    value, out = _argmin.value_and_hypergradient(f, g, method, inner, u, v, args)
    grad_v = jax.grad(scalar_output(g, "the lower objective g(u, v)"), argnums=1)
    dtype = jnp.result_type(value)
    info = HypergradientInfo(
      value=value,
      grad_norm=tree_norm(out.grad).astype(dtype),
      lower_grad_norm=tree_norm(grad_v(u, out.v, *args)).astype(dtype),
      finite=tree_all_finite(out.grad),
    )
    return like(out.grad, u), project_v(out.v), lower, info

  return Core(init, direction)


def penalized_grad_v(f, g, u, v, gamma, nu, args):
  """``(∇_v L, ∇_v g)``: the gradient in ``v`` alone (no products in ``u``)."""
  f_v = jax.grad(f, argnums=1)(u, v, *args)
  g_v, hvp = derivatives.grad_and_hvp_vv(g, u, v, *args)
  hv = hvp(jax.tree.map(lambda n, x: (n + gamma * x).astype(x.dtype), nu, g_v))
  return jax.tree.map(lambda a, b: (a + b).astype(a.dtype), f_v, hv), g_v


def penalized_grads(f, g, u, v, gamma, nu, args):
  """``(f, ∇_u L, ∇_v L, ∇_v g)`` of ``L = f + νᵀ∇_v g + (γ/2)|∇_v g|²``."""
  value, (f_u, f_v) = jax.value_and_grad(f, argnums=(0, 1))(u, v, *args)
  g_v = jax.grad(g, argnums=1)(u, v, *args)
  weight = jax.tree.map(lambda n, x: (n + gamma * x).astype(x.dtype), nu, g_v)
  mixed, hv = derivatives.hvp_joint(g, u, v, weight, *args)
  add = lambda a, b: (a + b).astype(a.dtype)
  return value, jax.tree.map(add, f_u, mixed), jax.tree.map(add, f_v, hv), g_v


def penalty_core(method: _methods.Penalty, inner: _argmin.Inner, project_v: Projection) -> Core:
  m, opt = method, inner.optimizer

  def init(u, v):
    dtype = jnp.result_type(*jax.tree.leaves(u))
    return PenaltyLower(
      opt_state=opt.init(v),
      gamma=jnp.asarray(m.gamma, dtype),
      epsilon=jnp.asarray(m.epsilon, dtype),
      nu=jax.tree.map(jnp.zeros_like, v),
      increases=jnp.zeros([], jnp.int32),
      rises=jnp.zeros([], jnp.int32),
      lower_grad_norm=jnp.full([], jnp.inf, dtype),
      first_lower_grad_norm=jnp.full([], jnp.inf, dtype),
    )

  def lower_steps(f, g, u, v, lower, num, args):
    def body(_, carry):
      v, opt_state = carry
      grad_v, g_v = penalized_grad_v(f, g, u, v, lower.gamma, lower.nu, args)
      if m.lower_weight:
        grad_v = jax.tree.map(lambda a, b: a + m.lower_weight * b, grad_v, g_v)
      updates, opt_state = opt.update(grad_v, opt_state, v)
      return project_v(optax.apply_updates(v, updates)), opt_state

    return jax.lax.fori_loop(0, num, body, (v, lower.opt_state))

  def direction(f, g, u, v, lower, args):
    f = scalar_output(f, "the upper objective f(u, v)")
    g = scalar_output(g, "the lower objective g(u, v)")
    first_step = jnp.isinf(lower.first_lower_grad_norm)  # the first since init
    num = inner.num_steps
    if m.warmup_steps:  # extra steps on v before u first moves
      num = num + jnp.where(first_step, m.warmup_steps, 0)
    v, opt_state = lower_steps(f, g, u, v, lower, num, args)
    value, grad_u, grad_v, g_v = penalized_grads(f, g, u, v, lower.gamma, lower.nu, args)
    dtype = lower.gamma.dtype
    sq = (tree_sq_norm(grad_u) + tree_sq_norm(grad_v)).astype(dtype)
    increase = sq < lower.epsilon**2
    nu = lower.nu
    if m.augmented:
      nu = jax.tree.map(
        lambda n, x: jnp.where(increase, n + lower.gamma * x, n).astype(n.dtype), nu, g_v
      )
    gamma = jnp.where(increase, jnp.minimum(m.gamma_factor * lower.gamma, m.max_gamma), lower.gamma)
    epsilon = jnp.where(increase, m.epsilon_factor * lower.epsilon, lower.epsilon)
    violation = tree_norm(g_v).astype(dtype)
    rises = jnp.where(violation > lower.lower_grad_norm, lower.rises + 1, 0)
    first = jnp.where(first_step, violation, lower.first_lower_grad_norm)
    new_lower = PenaltyLower(
      opt_state=opt_state,
      gamma=gamma.astype(dtype),
      epsilon=epsilon.astype(dtype),
      nu=nu,
      increases=lower.increases + increase.astype(jnp.int32),
      rises=rises,
      lower_grad_norm=violation,
      first_lower_grad_norm=first,
    )
    info = PenaltyInfo(
      value=value.astype(dtype),
      grad_norm=tree_norm(grad_u).astype(dtype),
      lower_grad_norm=violation,
      penalized_grad_sq=sq,
      gamma=new_lower.gamma,
      epsilon=new_lower.epsilon,
      increased=increase,
      diverging=((rises >= m.divergence_steps) & (violation > first)) | ~tree_all_finite(v),
      finite=tree_all_finite(grad_u),
    )
    return like(grad_u, u), v, new_lower, info

  return Core(init, direction)


def make_core(method: Any, inner: _argmin.Inner, project_v: Projection | None) -> Core:
  """The core of ``method``: the one place where the penalty method and the
  hypergradient methods part ways."""
  method = _methods.check_method(method, penalty_ok=True)
  project_v = checked_projection(project_v, "v")
  if isinstance(method, _methods.Penalty):
    return penalty_core(method, inner, project_v)
  return hypergradient_core(method, inner, project_v)


def solver(
  f: Callable[..., jax.Array],
  g: Callable[..., jax.Array],
  upper: optax.GradientTransformation,
  method: _methods.Method,
  *,
  num_steps: int,
  inner_lr: _argmin.StepSize | None = None,
  inner: optax.GradientTransformation | None = None,
  project_u: Projection | None = None,
  project_v: Projection | None = None,
) -> Solver:
  r"""The outer solver of ``min_u f(u, v*(u))``, ``v*(u) = argmin_v g(u, v)``, any method.

  Each step: the method's direction for ``u`` (a hypergradient through ``num_steps``
  inner steps warm-started at the previous ``v``; or, for ``Penalty``, ``∇_u L_γ`` after
  ``num_steps`` steps on ``L_γ`` in ``v``), then one step of ``upper`` and ``project_u``.
  ``project_v`` is applied to the stored ``v`` (for ``Penalty``, after every step on
  ``v``). To restart the inner problem at some step (fresh tasks in meta-learning),
  re-``init`` and keep the upper part: ``solver.init(key, state.u, v0)._replace(
  upper_state=state.upper_state, count=state.count)``.

  Args:
    f: upper objective ``f(u, v, *args) -> scalar``.
    g: lower objective ``g(u, v, *args) -> scalar``.
    upper: optax optimizer for ``u``.
    method: ``Naive()``, ``FMD()``, ``RMD(...)``, ``ApproxGrad(...)``, ``CG(...)``,
      ``Neumann(...)`` or ``Penalty(...)``.
    num_steps: T, steps on ``v`` per step on ``u``.
    inner_lr: the step size on ``v`` (a number or a schedule): plain gradient descent.
    inner: instead, any optax optimizer for ``v``. The hypergradient methods start its
      state (and a schedule's count) afresh at every outer step; the penalty method keeps
      it from step to step.
    project_u: optional projection of ``u`` after every step (same shapes and dtypes).
    project_v: optional projection of ``v``.

  Returns:
    ``Solver(init, step)``: ``init(key, u, v) -> BilevelState`` (the key is unused: the
    methods are deterministic) and ``step(state, *args) -> (BilevelState, info)`` with
    ``info`` a ``HypergradientInfo`` or, for ``Penalty``, a ``PenaltyInfo``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum(u ** 2) + jnp.sum(v ** 2)
    >>> g = lambda u, v: jnp.sum((1.0 - u - v) ** 2)  # solution u = v = 0.5
    >>> for method in [bilevel.CG(10), bilevel.Penalty(max_gamma=20.0, augmented=True)]:
    ...   solver = bilevel.solver(f, g, optax.sgd(0.01), method, num_steps=5, inner_lr=0.01)
    ...   state = solver.init(jax.random.key(0), jnp.zeros(2), jnp.zeros(2))
    ...   state, info = jax.jit(lambda s: kbeam_jax.run(solver.step, s, 3000))(state)
    ...   print(jnp.round(state.u, 2), jnp.round(state.v, 2))
    [0.5 0.5] [0.5 0.5]
    [0.5 0.5] [0.5 0.5]
  """
  inner_ = _argmin.check_inner(num_steps, inner_lr, inner)
  core = make_core(method, inner_, project_v)
  project_u = checked_projection(project_u, "u")

  def init(key: jax.Array, u: PyTree, v: PyTree) -> BilevelState:
    del key  # deterministic methods; the key keeps the API of every other solver
    check_float_leaves(u, "u")
    check_float_leaves(v, "v")
    return BilevelState(u, v, upper.init(u), core.init(u, v), jnp.zeros([], jnp.int32))

  def step(state: BilevelState, *args: Any) -> tuple[BilevelState, Any]:
    grad, v, lower, info = core.direction(f, g, state.u, state.v, state.lower, args)
    updates, upper_state = upper.update(grad, state.upper_state, state.u)
    u = project_u(optax.apply_updates(state.u, updates))
    return BilevelState(u, v, upper_state, lower, optax.safe_increment(state.count)), info

  return Solver(init, step)


def penalty(
  f: Callable[..., jax.Array],
  g: Callable[..., jax.Array],
  upper: optax.GradientTransformation,
  *,
  num_steps: int = 1,
  inner_lr: _argmin.StepSize | None = None,
  inner: optax.GradientTransformation | None = None,
  project_u: Projection | None = None,
  project_v: Projection | None = None,
  **options: Any,
) -> Solver:
  r"""The penalty method's solver: ``solver(f, g, upper, Penalty(**options), ...)``.

  See ``Penalty`` for the options (``gamma``, ``epsilon``, ``gamma_factor``,
  ``epsilon_factor``, ``max_gamma``, ``lower_weight``, ``augmented``, ``warmup_steps``)
  and ``solver`` for the rest. ``info`` is a ``PenaltyInfo``: watch ``diverging``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum(u ** 2) + jnp.sum(v ** 2)
    >>> g = lambda u, v: jnp.sum((1.0 - u - v) ** 2)
    >>> solver = bilevel.penalty(f, g, optax.sgd(0.01), num_steps=5, inner_lr=0.01,
    ...                          augmented=True, max_gamma=20.0)
    >>> state = solver.init(jax.random.key(0), jnp.zeros(2), jnp.zeros(2))
    >>> state, info = kbeam_jax.run(solver.step, state, 3000)
    >>> jnp.round(state.u, 2), bool(info.diverging.any())
    (Array([0.5, 0.5], dtype=float32), False)

  References:
    Mehra & Hamm, Penalty Method for Inversion-Free Deep Bilevel Optimization, ACML 2021.
  """
  method = _methods.Penalty(**options)
  return solver(
    f,
    g,
    upper,
    method,
    num_steps=num_steps,
    inner_lr=inner_lr,
    inner=inner,
    project_u=project_u,
    project_v=project_v,
  )
