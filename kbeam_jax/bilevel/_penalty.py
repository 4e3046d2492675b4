r"""The penalty method (Mehra & Hamm, ACML 2021): no inverse, no unrolling, its own solver.

It replaces ``v ∈ argmin g`` by ``∇_v g = 0`` enforced by a growing penalty and minimizes
jointly ``L_γ = f + νᵀ∇_v g + (γ/2)|∇_v g|²``:

  ``∇_u L = ∇_u f + ∇²_uv g (ν + γ∇_v g)``, ``∇_v L = ∇_v f + ∇²_vv g (ν + γ∇_v g)``
  (one ``hvp_joint``).

Each outer step takes ``inner_steps`` steps of the inner optimizer on ``L_γ + λg`` in
``v``, then one step on ``u`` along ``∇_u L``. When ``|∇L|² < ε²`` (where ``u``'s gradient
is taken) the schedule tightens: ``γ ← min(c_γ γ, γ_max)``, ``ε ← c_ε ε`` and, augmented,
``ν ← ν + γ∇_v g``.

Plain steps on ``L_γ`` in ``v`` are stable only while ``ρ·λ_max(∇²_vv L_γ) < 2`` (about
``ρ(λ_f + γλ_g²)``): with plain descent the solver tracks that curvature by one step of
power iteration per outer step (a Jacobian-vector product of ``∇_v L``) and reports
``stability = ρ·λ̂``; ``diverging`` turns true at the step where it reaches 2, or when
``|∇_v g|`` rose ``divergence_steps`` steps in a row to above ten times its first value
(``RUNAWAY_FACTOR``: a slow drift at a fixed γ, as ``u`` moves, is the method's trade-off,
not a run-away), or stopped being finite, or ``v`` did.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kbeam_jax import derivatives
from kbeam_jax._checks import (
  check_optimizer,
  check_steps,
  checked_projection,
  scalar_output,
)
from kbeam_jax._solver import Solver
from kbeam_jax._tree import (
  PyTree,
  tree_all_finite,
  tree_norm,
  tree_random_like,
  tree_sq_norm,
  tree_vdot,
)
from kbeam_jax.bilevel import _lower
from kbeam_jax.bilevel._methods import _require_int, _require_number
from kbeam_jax.bilevel._outer import Core, core_solver

# |∇_v g| above this many times its first value, after divergence_steps rises: a run-away
RUNAWAY_FACTOR = 10.0


@dataclasses.dataclass(frozen=True)
class PenaltySchedule:
  r"""The penalty method's settings (validated once; ``bilevel.penalty(**options)``).

  Attributes:
    gamma: γ_0 > 0.
    epsilon: ε_0 > 0.
    gamma_factor: c_γ >= 1, finite.
    epsilon_factor: c_ε in (0, 1].
    max_gamma: γ_max >= γ_0 (may be ``inf``). Plain steps on ``L_γ`` are stable only
      while ``ρ·λ_max(∇²_vv L_γ) < 2``: with a fixed inner step, cap γ.
    lower_weight: λ >= 0, weight of ``g`` added to ``v``'s objective.
    augmented: add the multiplier term ``νᵀ∇_v g`` (augmented Lagrangian).
    warmup_steps: extra steps on ``v`` in the first outer step, before ``u`` moves.
    divergence_steps: ``diverging`` once ``|∇_v g|`` has risen this many steps in a row to
      above ``RUNAWAY_FACTOR`` (10) times its value after the first step.
  """

  gamma: float = 1.0
  epsilon: float = 1.0
  gamma_factor: float = 1.1
  epsilon_factor: float = 0.9
  max_gamma: float = math.inf
  lower_weight: float = 0.0
  augmented: bool = False
  warmup_steps: int = 0
  divergence_steps: int = 10

  def __post_init__(self):
    _require_number("penalty", "gamma", self.gamma, positive=True)
    _require_number("penalty", "epsilon", self.epsilon, positive=True)
    _require_number("penalty", "lower_weight", self.lower_weight, positive=False)
    _require_int("penalty", "warmup_steps", self.warmup_steps, 0)
    _require_int("penalty", "divergence_steps", self.divergence_steps, 1)
    _require_number("penalty", "gamma_factor", self.gamma_factor, positive=True)
    if self.gamma_factor < 1:
      raise ValueError(f"penalty.gamma_factor must be >= 1, got {self.gamma_factor!r}.")
    if not (isinstance(self.epsilon_factor, int | float) and 0 < self.epsilon_factor <= 1):
      raise ValueError(f"penalty.epsilon_factor must be in (0, 1], got {self.epsilon_factor!r}.")
    ok = isinstance(self.max_gamma, int | float) and not isinstance(self.max_gamma, bool)
    if not (ok and self.max_gamma >= self.gamma):
      raise ValueError(
        f"penalty.max_gamma must be >= gamma={self.gamma} (inf for no cap), got "
        f"max_gamma={self.max_gamma!r}."
      )
    if not isinstance(self.augmented, bool):
      raise ValueError(f"penalty.augmented must be a bool, got {self.augmented!r}.")


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
  direction: PyTree  # the power iteration's vector for λ_max(∇²_vv L_γ)
  curvature: jax.Array  # its estimate


class PenaltyState(NamedTuple):
  """State of ``bilevel.penalty``."""

  u: PyTree
  v: PyTree
  upper_state: Any
  lower: PenaltyLower
  count: jax.Array


class PenaltyInfo(NamedTuple):
  """What a penalty step saw, after its steps on ``v`` and before ``u`` moved.

  Attributes:
    value: ``f(u, v)``.
    grad_norm: ``|∇_u L_γ|``, the direction of ``u``.
    lower_grad_norm: ``|∇_v g(u, v)|``, the constraint violation.
    penalized_grad_sq: ``|∇L_γ|²`` in ``(u, v)``, compared with ``ε²``.
    gamma, epsilon: the schedule for the next step.
    increased: the schedule tightened at this step.
    stability: ``ρ·λ̂``, the inner step times the estimated ``λ_max(∇²_vv L_γ)``; plain
      descent on ``v`` is stable below 2 (NaN with an optax inner optimizer).
    diverging: ``stability >= 2``, or ``|∇_v g|`` rose ``divergence_steps`` steps in a row
      to above ten times its value after the first step, or is not finite, or ``v`` is not: ``L_γ``
      is unbounded, or its steps unstable, at this γ. Raise γ_0 or lower ``max_gamma`` /
      ``inner_lr``.
    finite: ``∇_u L_γ`` is finite.
  """

  value: jax.Array
  grad_norm: jax.Array
  lower_grad_norm: jax.Array
  penalized_grad_sq: jax.Array
  gamma: jax.Array
  epsilon: jax.Array
  increased: jax.Array
  stability: jax.Array
  diverging: jax.Array
  finite: jax.Array


def _penalized_grad_v(f, g, u, v, gamma, nu, args):
  """``(∇_v L, ∇_v g)``: the gradient in ``v`` alone (no products in ``u``)."""
  f_v = jax.grad(f, argnums=1)(u, v, *args)
  g_v, hvp = derivatives.grad_and_hvp_vv(g, u, v, *args)
  hv = hvp(jax.tree.map(lambda n, x: (n + gamma * x).astype(x.dtype), nu, g_v))
  return jax.tree.map(lambda a, b: (a + b).astype(a.dtype), f_v, hv), g_v


def _penalized_grads(f, g, u, v, gamma, nu, args):
  """``(f, ∇_u L, ∇_v L, ∇_v g)`` of ``L = f + νᵀ∇_v g + (γ/2)|∇_v g|²``."""
  value, (f_u, f_v) = jax.value_and_grad(f, argnums=(0, 1))(u, v, *args)
  g_v = jax.grad(g, argnums=1)(u, v, *args)
  weight = jax.tree.map(lambda n, x: (n + gamma * x).astype(x.dtype), nu, g_v)
  mixed, hv = derivatives.hvp_joint(g, u, v, weight, *args)
  add = lambda a, b: (a + b).astype(a.dtype)
  return value, jax.tree.map(add, f_u, mixed), jax.tree.map(add, f_v, hv), g_v


def penalty_core(options: PenaltySchedule, inner_steps, inner_lr, inner, project_v) -> Core:
  """The penalty method's direction for ``u`` (``aux``: a ``PenaltyLower``), shared by the
  solver and the transform."""
  m = options
  steps = check_steps("inner_steps", inner_steps)
  if (inner_lr is None) == (inner is None):
    raise ValueError(
      "pass exactly one of inner_lr= (the step size on v: a number, an array or a schedule) "
      "and inner= (an optax optimizer for v), got " + ("neither." if inner_lr is None else "both.")
    )
  if inner is not None:
    opt, step_size = check_optimizer("inner", inner), None
  else:
    inner_lr = _lower.check_step_size("inner_lr", inner_lr, auto=False)
    if callable(inner_lr):
      _lower.check_schedule(inner_lr, max(steps, 1))
      opt, step_size = optax.sgd(inner_lr), inner_lr
    else:
      opt, step_size = optax.sgd(1.0), inner_lr
  plain_lr = step_size is not None and not callable(step_size)
  project_v = checked_projection(project_v, "v")

  def lr_at(lower):
    if step_size is None:
      return None
    if callable(step_size):
      return step_size(optax.tree.get(lower.opt_state, "count"))
    return step_size

  def init(u, v):
    dtype = jnp.promote_types(jnp.result_type(*jax.tree.leaves(u)), jnp.float32)
    return PenaltyLower(
      opt_state=opt.init(v),
      gamma=jnp.asarray(m.gamma, dtype),
      epsilon=jnp.asarray(m.epsilon, dtype),
      nu=jax.tree.map(jnp.zeros_like, v),
      increases=jnp.zeros([], jnp.int32),
      rises=jnp.zeros([], jnp.int32),
      lower_grad_norm=jnp.full([], jnp.inf, dtype),
      first_lower_grad_norm=jnp.full([], jnp.inf, dtype),
      direction=tree_random_like(v),
      curvature=jnp.zeros([], dtype),
    )

  def lower_steps(f, g, u, v, lower, num, args):
    def body(_, carry):
      v, opt_state = carry
      grad_v, g_v = _penalized_grad_v(f, g, u, v, lower.gamma, lower.nu, args)
      if m.lower_weight:
        grad_v = jax.tree.map(lambda a, b: a + m.lower_weight * b, grad_v, g_v)
      if plain_lr:
        grad_v = _lower.scale(step_size, grad_v)
      updates, opt_state = opt.update(grad_v, opt_state, v)
      return project_v(optax.apply_updates(v, updates)), opt_state

    return jax.lax.fori_loop(0, num, body, (v, lower.opt_state))

  def power_step(f, g, u, v, lower, args):
    """One step of power iteration on ``∇²_vv L_γ`` from the stored direction."""
    x = lower.direction
    scale = jax.lax.rsqrt(jnp.maximum(tree_sq_norm(x).astype(lower.gamma.dtype), 1e-30))
    x = jax.tree.map(lambda a: (a * scale).astype(a.dtype), x)
    grad_v = lambda w: _penalized_grad_v(f, g, u, w, lower.gamma, lower.nu, args)[0]
    Hx = jax.jvp(grad_v, (v,), (x,))[1]
    lam = jnp.abs(tree_vdot(x, Hx)).astype(lower.gamma.dtype)
    good = tree_all_finite(Hx) & (tree_sq_norm(Hx) > 0)
    return jax.tree.map(lambda a, b: jnp.where(good, a, b), Hx, x), lam

  def direction(f, g, u, v, lower, args):
    f = scalar_output(f, "the upper objective f(u, v)")
    g = scalar_output(g, "the lower objective g(u, v)")
    first_step = jnp.isinf(lower.first_lower_grad_norm)  # the first since init
    num = steps
    if m.warmup_steps:  # extra steps on v before u first moves
      num = num + jnp.where(first_step, m.warmup_steps, 0)
    rho = lr_at(lower)
    v, opt_state = lower_steps(f, g, u, v, lower, num, args)
    value, grad_u, grad_v, g_v = _penalized_grads(f, g, u, v, lower.gamma, lower.nu, args)
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
    bad = ~jnp.isfinite(violation)
    rises = jnp.where((violation > lower.lower_grad_norm) | bad, lower.rises + 1, 0)
    first = jnp.where(first_step, violation, lower.first_lower_grad_norm)
    if step_size is not None:
      direction_v, curvature = power_step(f, g, u, v, lower, args)
      rho_max = jnp.max(jnp.stack([jnp.max(r) for r in jax.tree.leaves(rho)]))
      stability = (rho_max * curvature).astype(dtype)
    else:
      direction_v, curvature = lower.direction, lower.curvature
      stability = jnp.full([], jnp.nan, dtype)
    new_lower = PenaltyLower(
      opt_state=opt_state,
      gamma=gamma.astype(dtype),
      epsilon=epsilon.astype(dtype),
      nu=nu,
      increases=lower.increases + increase.astype(jnp.int32),
      rises=rises,
      lower_grad_norm=violation,
      first_lower_grad_norm=first,
      direction=direction_v,
      curvature=curvature,
    )
    runaway = (rises >= m.divergence_steps) & ((violation > RUNAWAY_FACTOR * first) | bad)
    info = PenaltyInfo(
      value=value.astype(dtype),
      grad_norm=tree_norm(grad_u).astype(dtype),
      lower_grad_norm=violation,
      penalized_grad_sq=sq,
      gamma=new_lower.gamma,
      epsilon=new_lower.epsilon,
      increased=increase,
      stability=stability,
      diverging=runaway | bad | (stability >= 2) | ~tree_all_finite(v),
      finite=tree_all_finite(grad_u),
    )
    grad_u = jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), grad_u, u)
    return grad_u, v, new_lower, info

  return Core(init, direction)


def penalty(
  f: Callable[..., jax.Array],
  g: Callable[..., jax.Array],
  upper: optax.GradientTransformation,
  *,
  inner_steps: int = 1,
  inner_lr: Any = None,
  inner: optax.GradientTransformation | None = None,
  project_u: Callable[[PyTree], PyTree] | None = None,
  project_v: Callable[[PyTree], PyTree] | None = None,
  **options: Any,
) -> Solver:
  r"""The penalty method's solver for ``min_u f(u, v*(u))``: no hypergradient at all.

  See the module docstring for the iteration and ``PenaltySchedule`` for ``options``
  (``gamma``, ``epsilon``, ``gamma_factor``, ``epsilon_factor``, ``max_gamma``,
  ``lower_weight``, ``augmented``, ``warmup_steps``, ``divergence_steps``). ``info`` is a
  ``PenaltyInfo``: watch ``diverging`` and ``stability``.

  Args:
    f: upper objective ``f(u, v, *args) -> scalar``.
    g: lower objective ``g(u, v, *args) -> scalar``.
    upper: optax optimizer for ``u``.
    inner_steps: steps on ``v`` per step on ``u``.
    inner_lr: step size on ``v`` (a number, an array or a schedule): plain descent; or
    inner: any optax optimizer for ``v`` (its state kept from step to step).
    project_u, project_v: optional projections after every step.
    **options: the schedule (``PenaltySchedule``).

  Returns:
    ``Solver(init, step)``: ``init(key, u, v) -> PenaltyState``, ``step(state, *args) ->
    (PenaltyState, PenaltyInfo)``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum(u ** 2) + jnp.sum(v ** 2)
    >>> g = lambda u, v: jnp.sum((1.0 - u - v) ** 2)
    >>> solver = bilevel.penalty(f, g, optax.sgd(0.01), inner_steps=5, inner_lr=0.01,
    ...                          augmented=True, max_gamma=20.0)
    >>> state = solver.init(jax.random.key(0), jnp.zeros(2), jnp.zeros(2))
    >>> state, info = kbeam_jax.run(solver.step, state, 3000)
    >>> jnp.round(state.u, 2), bool(info.diverging.any())
    (Array([0.5, 0.5], dtype=float32), False)

  References:
    Mehra & Hamm, Penalty Method for Inversion-Free Deep Bilevel Optimization, ACML 2021.
  """
  upper = check_optimizer("upper", upper)
  core = penalty_core(PenaltySchedule(**options), inner_steps, inner_lr, inner, project_v)
  return core_solver(f, g, upper, core, project_u, PenaltyState)
