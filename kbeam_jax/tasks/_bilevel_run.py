"""One driver for the bilevel data tasks: the same ``(init, step)`` shape for every method.

``solver(method, f, g, ...)`` wraps the library's public API: ``bilevel.penalty`` for the
penalty method, ``bilevel.approxgrad`` / ``bilevel.rmd`` / ``bilevel.cg`` hypergradients
for the others, and the naive baseline (``v`` by T descent steps on ``g``, then ``∇_u f``
alone: the implicit term ``-∇²_uv g (∇²_vv g)⁻¹ ∇_v f`` dropped). All methods take the
same optax optimizer for ``u`` and warm-start ``v`` from the previous outer step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kbeam_jax import bilevel

METHODS = ("penalty", "approxgrad", "rmd", "naive")
# ApproxGrad's linear system solved by conjugate gradient instead of gradient descent
# (``solve_steps`` CG iterations): the remedy when ∇²_vv g is ill-conditioned.
EXTRA_METHODS = ("cg",)


class HypergradientState(NamedTuple):
  """State of a hypergradient method: both levels and the upper optimizer's state."""

  u: Any
  v: Any
  upper_state: Any
  count: jax.Array


class StepInfo(NamedTuple):
  """The upper objective ``f(u, v)`` after the step."""

  value: jax.Array


def keep_in_box(lower: float, upper: float) -> optax.GradientTransformation:
  """Turns ``updates`` into ``clip(params + updates, lower, upper) - params``.

  Chained after an optimizer it projects the parameters onto the box after each step.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from kbeam_jax.tasks import poisoning
    >>> tx = optax.chain(optax.sgd(1.0), poisoning.keep_in_box(0.0, 1.0))
    >>> x = jnp.array([0.5, 0.9])
    >>> updates, _ = tx.update(jnp.array([1.0, -0.5]), tx.init(x), x)
    >>> optax.apply_updates(x, updates)
    Array([0., 1.], dtype=float32)
  """
  if not lower < upper:
    raise ValueError(f"need lower < upper, got lower={lower}, upper={upper}.")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("keep_in_box needs params: call update(updates, state, params).")
    projected = jax.tree.map(
      lambda p, d: jnp.clip(p + d, lower, upper).astype(p.dtype) - p, params, updates
    )
    return projected, state

  return optax.GradientTransformation(init_fn, update_fn)


def solver(
  method: str,
  f: Callable[..., jax.Array],
  g: Callable[..., jax.Array],
  *,
  upper: optax.GradientTransformation,
  inner_lr: float,
  num_inner: int,
  solve_steps: int = 10,
  solve_lr: float | None = None,
  penalty_options: dict[str, Any] | None = None,
  penalty_lower: optax.GradientTransformation | None = None,
) -> bilevel.BilevelSolver:
  """``BilevelSolver(init, step)`` for ``method`` in ``METHODS`` on ``min_u f(u, v*(u))``.

  Args:
    method: ``"penalty"``, ``"approxgrad"``, ``"rmd"``, ``"naive"`` or ``"cg"``.
    f: upper objective ``f(u, v, *args)``.
    g: lower objective ``g(u, v, *args)``.
    upper: optax optimizer for ``u`` (chain ``keep_in_box`` for a box constraint).
    inner_lr: step size of the descent on ``v`` (all methods).
    num_inner: T, descent steps on ``v`` per outer step (warm-started).
    solve_steps: ApproxGrad's descent steps on the linear system (CG iterations for
      ``"cg"``).
    solve_lr: ApproxGrad's step size there (default ``inner_lr``).
    penalty_options: keyword arguments of ``bilevel.penalty`` (gamma, epsilon, ...).
    penalty_lower: the penalty method's optimizer for ``v`` (default
      ``optax.sgd(inner_lr)``); Adam's per-coordinate steps reach the penalty optimum far
      sooner when ``∇²_vv g`` is ill-conditioned.

  Returns:
    ``init(u, v) -> state`` and ``step(state, *args) -> (state, info)``; ``info.value`` is
    ``f`` after the step, ``state.u`` / ``state.v`` the current iterates.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from kbeam_jax.tasks import denoising
    >>> f = lambda u, v: jnp.sum((v - 1.0) ** 2)
    >>> g = lambda u, v: jnp.sum((v - u) ** 2) / 2  # v*(u) = u: the solution is u = 1
    >>> s = denoising.solver("rmd", f, g, upper=optax.sgd(0.1), inner_lr=0.5, num_inner=20)
    >>> state = s.init(jnp.array([3.0]), jnp.array([0.0]))
    >>> for _ in range(50):
    ...   state, info = s.step(state)
    >>> jnp.round(state.u, 3)
    Array([1.], dtype=float32)
  """
  if method not in METHODS + EXTRA_METHODS:
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS + EXTRA_METHODS)}.")
  if method == "penalty":
    lower = optax.sgd(inner_lr) if penalty_lower is None else penalty_lower
    return bilevel.penalty(f, g, upper, lower, num_inner=num_inner, **(penalty_options or {}))
  solve_lr = inner_lr if solve_lr is None else solve_lr

  def hypergradient(u, v, args):
    if method == "naive":
      v, _ = bilevel.inner_solve(g, u, v, args, num_inner, inner_lr)
      return jax.grad(f)(u, v, *args), v
    if method == "rmd":
      return bilevel.rmd(f, g, u, v, *args, num_steps=num_inner, inner_lr=inner_lr)
    if method == "cg":
      return bilevel.cg(
        f, g, u, v, *args, num_steps=num_inner, inner_lr=inner_lr, solve_steps=solve_steps
      )
    return bilevel.approxgrad(
      f,
      g,
      u,
      v,
      *args,
      num_steps=num_inner,
      inner_lr=inner_lr,
      solve_steps=solve_steps,
      solve_lr=solve_lr,
    )

  def init(u, v):
    return HypergradientState(u, v, upper.init(u), jnp.zeros([], jnp.int32))

  def step(state, *args):
    grad, v = hypergradient(state.u, state.v, args)
    updates, upper_state = upper.update(grad, state.upper_state, state.u)
    u = optax.apply_updates(state.u, updates)
    return HypergradientState(u, v, upper_state, state.count + 1), StepInfo(f(u, v, *args))

  return bilevel.BilevelSolver(init, step)


def run(solver_: bilevel.BilevelSolver, state: Any, num_steps: int, *args: Any):
  """``num_steps`` solver steps in one ``lax.scan``; returns ``(state, f values)``."""

  def body(state, _):
    state, info = solver_.step(state, *args)
    return state, info.value

  return jax.lax.scan(body, state, length=num_steps)
