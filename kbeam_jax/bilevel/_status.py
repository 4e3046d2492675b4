"""The status of a lower solve (``SolveInfo``) and the ``throw=True`` errors that explain it."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kbeam_jax import derivatives
from kbeam_jax._tree import tree_all_finite, tree_scaled_norm
from kbeam_jax.bilevel._lower import ARGMIN, Kind, Loop, Problem

DEFAULT_TOL = 1e-3  # the bar for ``converged`` when no ``tol`` is given
DIVERGENCE_FACTOR = 2.0  # |condition| grew by this factor over the solve: diverging


class SolveInfo(NamedTuple):
  """The status of a lower solve (``argmin(..., return_info=True)``).

  Attributes:
    grad_norm: ``|∇_v g|`` at the answer (for ``root`` ``|F|``, for ``fixed_point``
      ``|T(v) - v|``; with ``prox``/``project_v`` the gradient mapping's norm).
    inner_steps: steps the built-in loop took (``-1`` for the user's ``solve``).
    converged: finite and ``grad_norm <= tol`` (``tol`` = 1e-3 when not given).
    finite: the answer and ``grad_norm`` are finite.
    diverging: not finite, or not converged and ``grad_norm`` ended above twice its value
      at ``v0``: the solve moved away from a solution (an inner step above ``2/λ_max``,
      a lower problem unbounded below).
  """

  grad_norm: jax.Array
  inner_steps: jax.Array
  converged: jax.Array
  finite: jax.Array
  diverging: jax.Array


def status(problem: Problem, loop: Loop, u, v0, v, steps, data, params) -> SolveInfo:
  """``SolveInfo`` of an answer ``v`` (no derivative flows through it)."""
  u, v0, v, data, params = jax.lax.stop_gradient((u, v0, v, data, params))
  end = tree_scaled_norm(problem.condition(u, v, data, params))
  start = tree_scaled_norm(problem.condition(u, v0, data, params))
  wide = jnp.promote_types(end.dtype, jnp.float32)
  end, start = end.astype(wide), start.astype(wide)
  finite = tree_all_finite(v) & jnp.isfinite(end)
  converged = finite & (end <= (loop.tol if loop.tol is not None else DEFAULT_TOL))
  diverging = ~finite | (~converged & (end > DIVERGENCE_FACTOR * start))
  return SolveInfo(end, jnp.asarray(steps, jnp.int32), converged, finite, diverging), start


def _fmt(x) -> str:
  x = np.asarray(x, float)
  return np.array2string(x, precision=3) if x.ndim else f"{float(x):.3g}"


def raise_if_failed(kind: Kind, loop: Loop, info: SolveInfo, start, problem, u, v0, data, params):
  """``throw=True``: a ``jax.debug.callback`` that raises on the host, under ``jit`` too
  (the error reaches the caller as a ``JaxRuntimeError`` carrying this message)."""
  failed = info.diverging | ~info.finite | ((loop.tol is not None) & ~info.converged)
  sg = jax.lax.stop_gradient
  u, v0, data, params = sg((u, v0, data, params))

  def curvature():
    matvec = lambda x: jax.jvp(lambda w: problem.condition(u, w, data, params), (v0,), (x,))[1]
    return derivatives.max_eigenvalue(matvec, v0, symmetric=problem.symmetric)

  lam = jax.lax.cond(jnp.any(failed), curvature, lambda: jnp.zeros([], info.grad_norm.dtype))
  lr = params[0] if loop.schedule is None and loop.optimizer is None else None
  lr_leaf = (
    jnp.zeros([]) if lr is None else jnp.max(jnp.stack([jnp.max(x) for x in jax.tree.leaves(lr)]))
  )

  def callback(failed, end, start, steps, finite, lam, lr):
    if not np.any(failed):
      return
    raise FloatingPointError(_message(kind, loop, end, start, steps, finite, lam, lr))

  jax.debug.callback(
    callback, failed, info.grad_norm, start, info.inner_steps, info.finite, lam, sg(lr_leaf)
  )


def _message(kind: Kind, loop: Loop, end, start, steps, finite, lam, lr) -> str:
  lam_max = float(np.max(lam))
  where = f"{kind.name}: the inner solve"
  if loop.solve is not None:
    where = f"{kind.name}: your solve="
  curvature = (
    f"λ_max of ∂F/∂v at v0 ≈ {lam_max:.3g}"
    if kind is not ARGMIN
    else f"λ_max of ∇²_vv g at v0 ≈ {lam_max:.3g}"
  )
  if not np.all(finite):
    head = f"{where} returned non-finite values ({kind.residual} = {_fmt(end)})."
  elif (
    loop.tol is not None
    and not np.all(end <= loop.tol)
    and not np.any(end > DIVERGENCE_FACTOR * start)
  ):
    return (
      f"{where} did not reach tol={loop.tol:g} within inner_steps={loop.steps} "
      f"({kind.residual} = {_fmt(end)}, from {_fmt(start)} at v0). Raise inner_steps, or the "
      f"step size (stable below 2/λ_max ≈ {2 / lam_max:.3g}; {curvature})."
      if lam_max > 0
      else f"{where} did not reach tol={loop.tol:g} within inner_steps={loop.steps} "
      f"({kind.residual} = {_fmt(end)}). Raise inner_steps or the step size."
    )
  else:
    head = (
      f"{where} diverged: {kind.residual} went from {_fmt(start)} at v0 to {_fmt(end)} after "
      f"{_fmt(steps)} steps."
    )
  lr_max = float(np.max(lr))
  if loop.solve is None and loop.optimizer is None and loop.schedule is None and lam_max > 0:
    if lr_max * lam_max >= 2:
      return (
        f"{head} inner_lr {lr_max:.3g} is above 2/λ_max ≈ {2 / lam_max:.3g} ({curvature}): "
        'lower inner_lr below that, or pass inner_lr="auto" (1/λ_max).'
      )
    return (
      f"{head} inner_lr {lr_max:.3g} is below 2/λ_max ≈ {2 / lam_max:.3g} ({curvature}), so the "
      f"step is not the cause: check that {kind.function} is bounded below and convex near the "
      "solution, and that the inputs are finite."
    )
  return (
    f"{head} {curvature}. Lower the inner step size (plain descent is stable below "
    f"2/λ_max), check the inputs are finite, or check that {kind.function} has a solution."
  )
