r"""The lower problem of a bilevel program and its forward solve (settings and loop).

A lower problem is a *field* on ``v``: ``field(u, v, *args) -> (value, F)``, with
``(g, ∇_v g)`` for ``argmin``, ``(None, F)`` for ``root`` and ``(None, v - T(u, v))`` for
``fixed_point``. Its solution is a zero of the *condition*: ``F`` itself or, with a
proximal operator (a projection is one), the gradient mapping
``(v - prox(u, v - ρF, ρ)) / ρ``. The methods see a ``Problem``: a forward ``solve`` and
that ``condition``; how they differentiate the answer is theirs (``_methods.py``).

The forward solve is the user's ``solve(u, v0, *args) -> v`` or the built-in loop:
``inner_steps`` steps of plain descent ``v ← prox(v - ρ_t F)`` or of an optax optimizer fed
``F`` as the gradient (and ``value``, ``grad``, ``value_fn`` for line searches such as
``optax.lbfgs``), stopping early at ``|condition| <= tol`` when ``tol`` is given. What a
solve reports about its answer (``SolveInfo``, ``throw=True``) is in ``_status.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kbeam_jax import derivatives
from kbeam_jax._checks import check_optimizer, check_same_structure, check_steps, scalar_output
from kbeam_jax._tree import PyTree, tree_norm


class Kind(NamedTuple):
  """How a lower problem is posed: the field of the user's function, whether its Jacobian
  in ``v`` is symmetric (a Hessian), and the names its messages use."""

  name: str  # the public function, for messages
  residual: str  # what |condition| measures, for messages
  function: str  # the user's function, for messages
  symmetric: bool
  field: Callable[[Callable[..., Any]], Callable[..., tuple[Any, PyTree]]]


def _argmin_field(g):
  g = scalar_output(g, "the lower objective g(u, v)")
  return lambda u, v, *args: jax.value_and_grad(g, argnums=1)(u, v, *args)


def _checked_like_v(fn, name):
  def wrapped(u, v, *args):
    out = fn(u, v, *args)
    check_same_structure(v, out, "v", f"{name}(u, v)")
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(out), strict=True):
      if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
          f"{name}(u, v) must return a pytree shaped like v, but it turned a leaf of shape "
          f"{jnp.shape(a)} into {jnp.shape(b)}."
        )
    return jax.tree.map(lambda o, x: o.astype(jnp.result_type(x)), out, v)

  return wrapped


def _root_field(F):
  F = _checked_like_v(F, "F")
  return lambda u, v, *args: (None, F(u, v, *args))


def _fixed_point_field(T):
  T = _checked_like_v(T, "T")
  return lambda u, v, *args: (None, jax.tree.map(jnp.subtract, v, T(u, v, *args)))


ARGMIN = Kind("argmin", "|∇_v g|", "g", True, _argmin_field)
ROOT = Kind("root", "|F(u, v)|", "F", False, _root_field)
FIXED_POINT = Kind("fixed_point", "|T(u, v) - v|", "T", False, _fixed_point_field)


class Loop(NamedTuple):
  """The forward solve's static settings (hashable: a static argument of the compiled
  functions); the step size itself travels as a traced value."""

  steps: int | None  # the most inner steps (None with the user's solve)
  optimizer: optax.GradientTransformationExtraArgs | None  # inner=
  schedule: Callable[..., Any] | None  # a callable inner_lr
  auto: bool  # inner_lr="auto": 1/λ_max at the start
  tol: float | None
  prox: Callable[..., Any] | None  # prox(u, v, step, *args)
  solve: Callable[..., Any] | None  # the user's solve(u, v0, *args) -> v


class Problem(NamedTuple):
  """What a method differentiates: ``solve(u, v0, data, params, remat) -> (v, steps)``
  and ``condition(u, v, data, params) -> F`` (zero at the answer), ``F`` like ``v``.

  ``data`` (the user's arguments and the values their functions close over) is
  differentiated; ``params`` (the forward solve's step sizes) only by the unrolled
  methods. ``remat`` is the method's ``remat`` (how the built-in loop stores its steps).
  """

  solve: Callable[..., tuple[PyTree, jax.Array]]
  condition: Callable[..., PyTree]
  symmetric: bool


# ---------------------------------------------------------------------------- checks


def _is_number(x: Any) -> bool:
  return isinstance(x, int | float | np.number) and not isinstance(x, bool)


def check_step_size(name: str, value: Any, *, auto: bool = True, schedule: bool = True):
  """Validates a step size: a number, an array (a scalar, or a pytree like ``v`` for
  per-coordinate steps), a traced value, ``"auto"`` or a schedule ``t -> ρ_t``. Concrete
  values must be finite and > 0; traced ones are checked at run time by ``throw=True``."""
  if isinstance(value, str):
    if auto and value == "auto":
      return value
    raise ValueError(f'{name} must be a number > 0, a schedule or "auto", got {value!r}.')
  if callable(value) and not isinstance(value, jax.Array):
    if not schedule:
      raise TypeError(f"{name} cannot be a schedule here; pass a number > 0 or an array.")
    return value
  if isinstance(value, bool) or value is None:
    raise TypeError(f"{name} must be a number > 0, an array or a schedule, got {value!r}.")
  leaves = jax.tree.leaves(value)
  if not leaves or not all(_is_number(x) or isinstance(x, jax.Array | np.ndarray) for x in leaves):
    raise TypeError(f"{name} must be a number > 0, an array or a schedule, got {value!r}.")
  for x in leaves:
    if isinstance(x, jax.core.Tracer):
      continue
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.number) or not np.all(np.isfinite(a) & (a > 0)):
      raise ValueError(f"{name} must be finite and > 0, got {name}={value!r}.")
  return value


@functools.lru_cache(maxsize=256)
def _check_schedule(schedule: Callable[..., Any], steps: int) -> None:
  """Raises unless ``schedule`` is finite and > 0 on steps ``0..steps-1`` (once per
  schedule and count; a schedule over traced values is checked by ``throw=True``)."""
  values = jax.vmap(schedule)(jnp.arange(max(steps, 1)))
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(values)):
    return
  values = np.asarray(values)
  good = np.isfinite(values) & (values > 0)
  if not np.all(good):
    bad = int(np.argmax(~good.reshape(-1)))
    raise ValueError(
      f"the inner_lr schedule must give finite values > 0 on the steps 0..{steps - 1}, got "
      f"{values.reshape(-1)[bad]} at step {bad}."
    )


def check_schedule(schedule, steps):
  try:
    _check_schedule(schedule, steps)
  except TypeError:  # unhashable: check without the cache
    _check_schedule.__wrapped__(schedule, steps)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    pass


def make_loop(
  *,
  method,
  inner_steps: Any,
  inner_lr: Any,
  inner: Any,
  tol: Any,
  prox: Any,
  solve: Any,
  default_lr: Any = None,
) -> tuple[Loop, Any]:
  """Validates the forward solve's settings; returns ``(Loop, lr)``, ``lr`` the traced
  step size (or ``None``)."""
  if tol is not None:
    if not _is_number(tol) or not (math.isfinite(tol) and tol > 0):
      raise ValueError(f"tol must be a finite number > 0, got tol={tol!r}.")
    if method.unrolled:
      raise ValueError(
        f"{method!r} differentiates through the inner steps, so it cannot stop at a "
        "tolerance: a loop whose length depends on u has no derivative to unroll (and "
        "reverse mode cannot go through a while_loop). Use a fixed inner_steps, or an "
        "implicit method (bilevel.CG(...), ...) with tol=."
      )
  if prox is not None and not callable(prox):
    raise TypeError(f"prox must be a function prox(u, v, step, *args) -> v, got {prox!r}.")
  if solve is not None:
    if not callable(solve):
      raise TypeError(f"solve must be a function solve(u, v0, *args) -> v, got {solve!r}.")
    if inner_steps is not None or inner is not None or tol is not None:
      raise ValueError(
        "solve= replaces the built-in loop: drop inner_steps=, inner= and tol= (the solve "
        "decides how far to go; info.grad_norm reports where it ended)."
      )
    lr = "auto" if inner_lr is None else inner_lr  # the prox condition's step
    lr = check_step_size("inner_lr", lr, schedule=False)
    return Loop(None, None, None, lr == "auto", None, prox, solve), _traced(lr)
  if inner_steps is None:
    raise TypeError(
      "pass inner_steps= (the most steps of the built-in inner loop), or bring your own "
      "forward solver with solve=."
    )
  steps = check_steps("inner_steps", inner_steps)
  if inner_lr is None and inner is None:
    inner_lr = default_lr
  if (inner_lr is None) == (inner is None):
    raise ValueError(
      'pass exactly one of inner_lr= (the inner step size: a number, an array, "auto" or a '
      "schedule) and inner= (an optax optimizer for v), got "
      + ("neither." if inner_lr is None else "both.")
    )
  if inner is not None:
    if prox is not None:
      raise ValueError(
        "prox/project_v need plain projected (proximal) descent, whose step the fixed-point "
        "condition uses: pass inner_lr= instead of inner=, or your own solve=."
      )
    return Loop(steps, check_optimizer("inner", inner), None, False, tol, None, None), None
  inner_lr = check_step_size("inner_lr", inner_lr, schedule=prox is None)
  if callable(inner_lr):
    check_schedule(inner_lr, steps)
    return Loop(steps, None, inner_lr, False, tol, None, None), None
  return Loop(steps, None, None, inner_lr == "auto", tol, prox, None), _traced(inner_lr)


def _traced(lr):
  if isinstance(lr, str):
    return None
  return jax.tree.map(jnp.asarray, lr)


# --------------------------------------------------------------------------- building


def lift(fn: Callable[..., Any], *example: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """``fn`` with the traced values it closes over made explicit trailing arguments (the
  custom derivative rules differentiate their explicit inputs only)."""
  converted, consts = jax.closure_convert(fn, *example)
  return converted, tuple(consts)


def scale(rho: Any, tree: PyTree) -> PyTree:
  """``ρ·x`` leaf by leaf, ``ρ`` a scalar or a pytree like ``x``; dtypes of ``x`` kept."""
  if jax.tree.structure(rho) == jax.tree.structure(tree) and jax.tree.leaves(tree):
    return jax.tree.map(lambda r, x: (r * x).astype(x.dtype), rho, tree)
  return jax.tree.map(lambda x: (rho * x).astype(x.dtype), tree)


def _divide(tree: PyTree, rho: Any) -> PyTree:
  if jax.tree.structure(rho) == jax.tree.structure(tree) and jax.tree.leaves(tree):
    return jax.tree.map(lambda x, r: (x / r).astype(x.dtype), tree, rho)
  return jax.tree.map(lambda x: (x / rho).astype(x.dtype), tree)


def jacobian_matvec(field, u, v, args):
  """``x ↦ ∂_v F(u, v) · x`` (for ``argmin`` the Hessian-vector product)."""
  return lambda x: jax.jvp(lambda v_: field(u, v_, *args)[1], (v,), (x,))[1]


def build(kind: Kind, fn, loop: Loop, u, v0, args, lr) -> tuple[Problem, Any, Any]:
  """``(Problem, data, params)`` of a lower problem, traced values made explicit."""
  fn, fn_consts = lift(fn, u, v0, *args)
  field = kind.field(fn)
  at = lambda u, v, data: field(u, v, *data[0], *data[1])
  data0 = (tuple(args), fn_consts, ())
  if loop.auto:  # 1/λ_max of ∂_v F at the start (no derivative: a step size)
    lam = derivatives.max_eigenvalue(
      jacobian_matvec(lambda u, v: at(u, v, data0), *jax.lax.stop_gradient((u, v0)), ()),
      v0,
      symmetric=kind.symmetric,
    )
    lr = jnp.where(jnp.isfinite(lam) & (lam > 0), 1.0 / lam, 1.0)
  prox, prox_consts = None, ()
  if loop.prox is not None:
    prox, prox_consts = lift(loop.prox, u, v0, lr, *args)
  schedule, schedule_consts = None, ()
  if loop.schedule is not None:
    schedule, schedule_consts = lift(loop.schedule, jnp.zeros([], jnp.int32))
  solve, solve_consts = None, ()
  if loop.solve is not None:
    solve, solve_consts = lift(loop.solve, u, v0, *args)
  data = (tuple(args), fn_consts, prox_consts)
  params = (lr, schedule_consts, solve_consts)

  def apply_prox(u, v, rho, data):
    return prox(u, v, rho, *data[0], *data[2])

  def condition(u, v, data, params):
    _, F = at(u, v, data)
    if prox is None:
      return F
    rho = params[0]
    stepped = jax.tree.map(jnp.subtract, v, scale(rho, F))
    return _divide(jax.tree.map(jnp.subtract, v, apply_prox(u, stepped, rho, data)), rho)

  def forward(u, v0, data, params, remat):
    if solve is not None:
      v = solve(u, v0, *data[0], *params[2])
      check_same_structure(v0, v, "v0", "solve(u, v0, *args)")
      v = jax.tree.map(lambda a, b: a.astype(jnp.result_type(b)), v, v0)
      return v, jnp.asarray(-1, jnp.int32)
    step_size = (lambda t: schedule(t, *params[1])) if schedule else (lambda t: params[0])
    return run_loop(kind, at, apply_prox if prox else None, loop, step_size, u, v0, data, remat)

  symmetric = kind.symmetric and prox is None
  return Problem(forward, condition, symmetric), data, params


# ------------------------------------------------------------------------------ loop


def run_loop(kind, at, prox, loop: Loop, step_size, u, v0, data, remat):
  """The built-in forward solve: ``loop.steps`` steps, or fewer at ``loop.tol``."""
  opt = loop.optimizer

  def advance(t, v, state, value, F):
    if opt is not None:
      extra = {}
      if value is not None:
        extra = dict(value=value, grad=F, value_fn=lambda w: at(u, w, data)[0])
      try:
        updates, state = opt.update(F, state, v, **extra)
      except TypeError as e:
        raise TypeError(
          f"the inner optimizer could not be driven by {kind.name}'s built-in loop: {e}. "
          "The loop passes the gradient and, for argmin, value=, grad= and value_fn= (what "
          "optax's line searches and optax.lbfgs() take); an optimizer that needs more "
          "(or a root/fixed_point problem with a line search) needs your own solve=."
        ) from e
      return optax.apply_updates(v, updates), state
    rho = step_size(t)
    v = jax.tree.map(jnp.subtract, v, scale(rho, F))
    return (v if prox is None else prox(u, v, rho, data)), state

  state0 = opt.init(v0) if opt is not None else ()
  zero = jnp.zeros([], jnp.int32)
  if loop.tol is None:

    def step(carry, _):
      t, v, state = carry
      value, F = at(u, v, data)
      v, state = advance(t, v, state, value, F)
      return (t + 1, v, state), None

    T = loop.steps
    carry = (zero, v0, state0)
    if remat is not None:
      step = jax.checkpoint(step)
    if remat == "sqrt" and T > 1:
      c = math.isqrt(T - 1) + 1  # ⌈√T⌉
      segment = jax.checkpoint(lambda carry, _: (jax.lax.scan(step, carry, length=c)[0], None))
      carry, _ = jax.lax.scan(segment, carry, length=T // c)
      T = T % c
    (steps, v, _), _ = jax.lax.scan(step, carry, length=T)
    return v, steps

  def residual(v, F):
    if prox is None:
      return tree_norm(F)
    rho = step_size(0)
    stepped = prox(u, jax.tree.map(jnp.subtract, v, scale(rho, F)), rho, data)
    return tree_norm(_divide(jax.tree.map(jnp.subtract, v, stepped), rho))

  def cond(carry):
    t, _, _, _, _, norm = carry
    return (t < loop.steps) & ~(norm <= loop.tol)  # a NaN norm stops too (below)

  def body(carry):
    t, v, state, value, F, _ = carry
    v, state = advance(t, v, state, value, F)
    value, F = at(u, v, data)
    norm = residual(v, F)
    return t + 1, v, state, value, F, jnp.where(jnp.isnan(norm), 0.0, norm)

  value, F = at(u, v0, data)
  carry = (zero, v0, state0, value, F, residual(v0, F))
  steps, v, _, _, _, _ = jax.lax.while_loop(cond, body, carry)
  return v, steps
