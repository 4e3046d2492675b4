r"""The penalty method for bilevel problems (Mehra & Hamm, ACML 2021), inversion-free.

Replaces ``v = argmin_v g(u, v)`` by its optimality condition ``∇_v g = 0`` enforced by a
growing penalty: minimize jointly in ``(u, v)``

    L_γ(u, v) = f(u, v) + νᵀ∇_v g(u, v) + (γ/2)|∇_v g(u, v)|²,

whose gradients need only Hessian-vector products:
``∇_v L = ∇_v f + ∇²_vv g (ν + γ∇_v g)``, ``∇_u L = ∇_u f + ∇²_uv g (ν + γ∇_v g)``
(one ``hvp_joint``). Each step takes T descent steps on ``v`` (on ``L + λ g``, the small
``λ g`` term of the published code) and one on ``u``. When ``|∇L|² < ε²`` the schedule
tightens: ``γ ← c_γ γ``, ``ε ← c_ε ε`` and, in the augmented-Lagrangian variant,
``ν ← ν + γ∇_v g``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kbeam_jax import derivatives
from kbeam_jax._checks import check_float_leaves, check_nonnegative, check_steps, scalar_output
from kbeam_jax._tree import tree_norm, tree_sq_norm

PyTree = Any


class PenaltyState(NamedTuple):
  """State of the penalty method; ``nu`` is zeros unless ``augmented=True``."""

  u: PyTree
  v: PyTree
  upper_state: Any
  lower_state: Any
  gamma: jax.Array
  epsilon: jax.Array
  nu: PyTree
  count: jax.Array  # outer steps taken
  increases: jax.Array  # times the schedule tightened


class PenaltyInfo(NamedTuple):
  """``f``, ``|∇_v g|``, the squared norm of ``∇L`` and the schedule, at the step's end."""

  value: jax.Array
  grad_v_g_norm: jax.Array
  penalized_grad_sq: jax.Array
  gamma: jax.Array
  epsilon: jax.Array
  increased: jax.Array


def steps_now(num_inner: int, warmup_steps: int, count: jax.Array):
  """T, plus ``warmup_steps`` on the first update (``count == 0``); static when no warm-up."""
  if not warmup_steps:
    return num_inner
  return num_inner + jnp.where(count == 0, warmup_steps, 0)


def lower_steps(f, g, lower, num_inner, lower_weight, u, v, lower_state, gamma, nu, args):
  """``num_inner`` (static or traced) steps of ``lower`` on ``v`` for ``L_γ + λ g`` at
  fixed ``u``."""

  def body(_, carry):
    v, lower_state = carry
    _, grad_v, g_v = penalized_grads(f, g, u, v, gamma, nu, args)
    grad_v = jax.tree.map(lambda a, b: a + lower_weight * b, grad_v, g_v)
    updates, lower_state = lower.update(grad_v, lower_state, v)
    return optax.apply_updates(v, updates), lower_state

  return jax.lax.fori_loop(0, num_inner, body, (v, lower_state))


def tighten(
  grad_u, grad_v, g_v, gamma, epsilon, nu, gamma_factor, epsilon_factor, augmented, max_gamma
):
  """The schedule after a step: ``(γ, ε, ν, |∇L|², increased)``."""
  sq = (tree_sq_norm(grad_u) + tree_sq_norm(grad_v)).astype(gamma.dtype)
  increase = sq < epsilon**2
  if augmented:
    nu = jax.tree.map(lambda n, x: jnp.where(increase, n + gamma * x, n), nu, g_v)
  return (
    jnp.where(increase, jnp.minimum(gamma_factor * gamma, max_gamma), gamma),
    jnp.where(increase, epsilon_factor * epsilon, epsilon),
    nu,
    sq,
    increase,
  )


def check_schedule(gamma, epsilon, gamma_factor, epsilon_factor, lower_weight):
  for name, value in [("gamma", gamma), ("epsilon", epsilon), ("lower_weight", lower_weight)]:
    check_nonnegative(name, value)
  if gamma_factor < 1.0 or not 0.0 < epsilon_factor <= 1.0:
    raise ValueError(
      f"need gamma_factor >= 1 and 0 < epsilon_factor <= 1, got "
      f"gamma_factor={gamma_factor} and epsilon_factor={epsilon_factor}."
    )


class BilevelSolver(NamedTuple):
  """A pure solver: ``state = init(u, v)``, ``state, info = step(state, *args)``."""

  init: Callable[..., Any]
  step: Callable[..., tuple[Any, Any]]


def penalized_grads(f, g, u, v, gamma, nu, args):
  """``(∇_u L, ∇_v L, ∇_v g)`` of ``L = f + νᵀ∇_v g + (γ/2)|∇_v g|²``."""
  f_u, f_v = jax.grad(f, argnums=(0, 1))(u, v, *args)
  g_v = jax.grad(g, argnums=1)(u, v, *args)
  weight = jax.tree.map(lambda n, x: n + gamma * x, nu, g_v)
  mixed, hv = derivatives.hvp_joint(g, u, v, weight, *args)
  return jax.tree.map(jnp.add, f_u, mixed), jax.tree.map(jnp.add, f_v, hv), g_v


def penalty(
  f: Callable[..., jax.Array],
  g: Callable[..., jax.Array],
  upper: optax.GradientTransformation,
  lower: optax.GradientTransformation,
  *,
  num_inner: int = 1,
  gamma: float = 1.0,
  epsilon: float = 1.0,
  gamma_factor: float = 1.1,
  epsilon_factor: float = 0.9,
  lower_weight: float = 0.0,
  augmented: bool = False,
  max_gamma: float = float("inf"),
  warmup_steps: int = 0,
) -> BilevelSolver:
  r"""Penalty-method solver for ``min_u f(u, v*(u))``, ``v*(u) = argmin_v g(u, v, *args)``.

  Args:
    f: upper objective ``f(u, v, *args) -> scalar``.
    g: lower objective ``g(u, v, *args) -> scalar``.
    upper: optax optimizer for ``u`` (σ is its learning rate).
    lower: optax optimizer for ``v`` (ρ).
    num_inner: T, steps on ``v`` per step on ``u``.
    gamma: initial penalty γ_0 > 0.
    epsilon: initial tolerance ε_0 > 0.
    gamma_factor: c_γ >= 1.
    epsilon_factor: c_ε in (0, 1].
    lower_weight: λ >= 0, weight of ``g`` added to ``v``'s objective.
    augmented: add the multiplier term ``νᵀ∇_v g`` (augmented Lagrangian).
    max_gamma: cap on γ. Plain gradient steps on ``L_γ`` are stable only while
      ``ρ γ λ_max(∇²_vv g)² < 2``: with fixed step sizes, cap γ (the augmented variant
      removes the O(1/γ) bias a capped γ leaves) or shrink the steps with γ.
    warmup_steps: extra steps on ``v`` in the first step, before ``u`` moves. Started at
      the lower optimum, ``v`` is far from the minimizer of ``L_γ`` when ``∇²_vv g`` is
      ill-conditioned (``L_γ``'s curvature in ``v`` is ``∇²f + γ(∇²_vv g)²``: the
      condition number squared), and until it gets there ``∇_u L`` is not the
      hypergradient.

  Returns:
    ``BilevelSolver(init, step)``: ``init(u, v) -> PenaltyState`` and
    ``step(state, *args) -> (PenaltyState, PenaltyInfo)``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum(u ** 2) + jnp.sum(v ** 2)
    >>> g = lambda u, v: jnp.sum((1.0 - u - v) ** 2)  # solution u = v = 0.5
    >>> solver = bilevel.penalty(f, g, optax.sgd(0.01), optax.sgd(0.01), num_inner=5,
    ...                          augmented=True, max_gamma=20.0)
    >>> state, _ = kbeam_jax.run(solver.step, solver.init(jnp.zeros(2), jnp.zeros(2)), 3000)
    >>> jnp.round(state.u, 2), jnp.round(state.v, 2)
    (Array([0.5, 0.5], dtype=float32), Array([0.5, 0.5], dtype=float32))

  References:
    Mehra & Hamm, Penalty Method for Inversion-Free Deep Bilevel Optimization, ACML 2021.
  """
  num_inner = check_steps("num_inner (T)", num_inner)
  warmup_steps = check_steps("warmup_steps", warmup_steps)
  check_schedule(gamma, epsilon, gamma_factor, epsilon_factor, lower_weight)
  f = scalar_output(f, "the upper objective f(u, v)")
  g = scalar_output(g, "the lower objective g(u, v)")

  def init(u: PyTree, v: PyTree) -> PenaltyState:
    check_float_leaves(u, "u")
    check_float_leaves(v, "v")
    dtype = jnp.result_type(*jax.tree.leaves(u))
    return PenaltyState(
      u=u,
      v=v,
      upper_state=upper.init(u),
      lower_state=lower.init(v),
      gamma=jnp.asarray(gamma, dtype),
      epsilon=jnp.asarray(epsilon, dtype),
      nu=jax.tree.map(jnp.zeros_like, v),
      count=jnp.zeros([], jnp.int32),
      increases=jnp.zeros([], jnp.int32),
    )

  def step(state: PenaltyState, *args: Any) -> tuple[PenaltyState, PenaltyInfo]:
    u, gam, nu = state.u, state.gamma, state.nu
    num = steps_now(num_inner, warmup_steps, state.count)
    v, lower_state = lower_steps(
      f, g, lower, num, lower_weight, u, state.v, state.lower_state, gam, nu, args
    )
    grad_u, _, _ = penalized_grads(f, g, u, v, gam, nu, args)
    updates, upper_state = upper.update(grad_u, state.upper_state, u)
    u = optax.apply_updates(u, updates)
    grad_u, grad_v, g_v = penalized_grads(f, g, u, v, gam, nu, args)
    new_gamma, new_eps, nu, sq, increase = tighten(
      grad_u,
      grad_v,
      g_v,
      gam,
      state.epsilon,
      nu,
      gamma_factor,
      epsilon_factor,
      augmented,
      max_gamma,
    )
    new_state = PenaltyState(
      u=u,
      v=v,
      upper_state=upper_state,
      lower_state=lower_state,
      gamma=new_gamma,
      epsilon=new_eps,
      nu=nu,
      count=state.count + 1,
      increases=state.increases + increase.astype(jnp.int32),
    )
    info = PenaltyInfo(
      value=f(u, v, *args),
      grad_v_g_norm=tree_norm(g_v).astype(gam.dtype),
      penalized_grad_sq=sq,
      gamma=new_state.gamma,
      epsilon=new_state.epsilon,
      increased=increase,
    )
    return new_state, info

  return BilevelSolver(init, step)
