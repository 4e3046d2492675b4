r"""``hypergradient``: the method's derivative of ``f(u, v*(u))``, with both solves' status.

``hypergradient_step`` is its traceable core, shared with the outer solver (``_outer.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kbeam_jax import derivatives
from kbeam_jax._checks import check_float_leaves, scalar_output
from kbeam_jax._tree import PyTree, tree_all_finite, tree_scaled_norm
from kbeam_jax.bilevel import _lower, _methods, _status
from kbeam_jax.bilevel._argmin import InnerSettings, make_loop


class HypergradientInfo(NamedTuple):
  """What a hypergradient saw, at the ``u`` it was taken at.

  Attributes:
    value: ``f(u, v)``, ``v`` the inner answer.
    grad_norm: ``|hypergradient|``.
    lower_grad_norm: ``|∇_v g(u, v)|``, how far the inner solve is from stationary.
    inner_steps: steps the inner loop took (``-1`` for the user's ``solve=``).
    converged: the inner solve reached ``tol`` (1e-3 when not given).
    diverging: the inner solve diverged (see ``SolveInfo``), or the linear solve did
      (``linear_residual`` above 1, worse than the zero answer, or not finite).
    linear_residual: ``|Aᵀq - ∇_v f| / |∇_v f|`` of the implicit methods' linear solve
      (0 for the methods without one: ``Naive``, ``FMD``, ``RMD``).
    finite: the hypergradient is finite.
    negative_curvature: the linear solve met a direction ``p`` with ``pᵀ∇²_vv g p < 0``
      (``CG`` looks; the other methods report ``False``): the lower Hessian is not positive
      definite at ``v``, a saddle or a maximum of ``g`` rather than the minimum ``argmin``
      stands for. ``kbeam_jax.run`` warns (``SolverWarning``) when a step sets it.
  """

  value: jax.Array
  grad_norm: jax.Array
  lower_grad_norm: jax.Array
  inner_steps: jax.Array
  converged: jax.Array
  diverging: jax.Array
  linear_residual: jax.Array
  finite: jax.Array
  negative_curvature: jax.Array


class Hypergradient(NamedTuple):
  """A hypergradient, the inner answer it was taken at, and the status of both solves."""

  grad: PyTree  # like u
  v: PyTree  # the inner answer (the next warm start)
  info: HypergradientInfo


def hypergradient_step(f, method, loop, throw, problem_parts, u, v0, args, q0):
  """``(Hypergradient, q)`` of ``f`` at ``u`` (traceable, no checks): the method's
  hypergradient, the status of both solves, and the linear solve's answer ``q`` (the next
  warm start)."""
  g, lr = problem_parts
  f = scalar_output(f, "the upper objective f(u, v)")
  problem, data, params = _lower.build(_lower.ARGMIN, g, loop, u, v0, args, lr)
  upper = lambda u_, v_: f(u_, v_, *args)
  value, grad, v, steps, q, residual, negative = method.hypergradient(
    upper, problem, u, v0, data, params, q0
  )
  grad = jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), grad, u)
  solve_info, start = _status.status(problem, loop, u, v0, v, steps, data, params)
  dtype = solve_info.grad_norm.dtype
  residual = jnp.asarray(residual, dtype)
  linear_failed = ~(residual <= 1.0)
  info = HypergradientInfo(
    value=jnp.asarray(value).astype(dtype),
    grad_norm=tree_scaled_norm(grad).astype(dtype),
    lower_grad_norm=solve_info.grad_norm,
    inner_steps=solve_info.inner_steps,
    converged=solve_info.converged,
    diverging=solve_info.diverging | linear_failed,
    linear_residual=residual,
    finite=tree_all_finite(grad),
    negative_curvature=jnp.asarray(negative, bool),
  )
  if throw:
    _status.raise_if_failed(_lower.ARGMIN, loop, solve_info, start, problem, u, v0, data, params)
    _raise_if_linear_failed(method, problem, linear_failed, residual, u, v, data, params)
  return Hypergradient(grad, v, info), q


def _raise_if_linear_failed(method, problem, failed, residual, u, v, data, params):
  sg = jax.lax.stop_gradient
  u, v, data, params = sg((u, v, data, params))

  def curvature():
    matvec = lambda x: jax.jvp(lambda w: problem.condition(u, w, data, params), (v,), (x,))[1]
    return derivatives.max_eigenvalue(matvec, v, symmetric=problem.symmetric)

  lam = jax.lax.cond(jnp.any(failed), curvature, lambda: jnp.zeros([], residual.dtype))

  def callback(failed, residual, lam):
    import numpy as np

    if not np.any(failed):
      return
    raise FloatingPointError(
      f"hypergradient: the linear solve of {method!r} failed (relative residual "
      f"{float(np.max(residual)):.3g}; above 1 is worse than the zero answer). "
      + method.failure_hint(float(np.max(lam)))
    )

  jax.debug.callback(callback, failed, residual, lam)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _hypergradient_jit(f, g, method, loop, throw, u, v0, args, lr):
  out, _ = hypergradient_step(f, method, loop, throw, (g, lr), u, v0, args, None)
  return out


def hypergradient(
  f: Callable[..., jax.Array],
  g: Callable[..., jax.Array],
  u: PyTree,
  v0: PyTree,
  *args: Any,
  method: _methods.Method,
  solve: Callable[..., PyTree] | None = None,
  inner_steps: int | None = None,
  inner_lr: Any = None,
  inner: optax.GradientTransformation | None = None,
  tol: float | None = None,
  project_v: Callable[[PyTree], PyTree] | None = None,
  prox: Callable[..., PyTree] | None = None,
  throw: bool = False,
) -> Hypergradient:
  r"""The hypergradient of ``u ↦ f(u, v*(u), *args)``, ``v*`` from ``argmin``, with status.

  Equal to ``jax.grad(lambda u: f(u, argmin(g, u, v0, *args, ...), *args))(u)``; the
  implicit methods compute it in adjoint form, ``(∂_v F)ᵀ q = ∇_v f`` then
  ``∇_u f - (∂_u F)ᵀ q``, so that the linear solve's residual can be reported. For a
  converged inner solve and an accurate linear solve every method approaches the true
  hypergradient ``∇_u f - ∇²_uv g (∇²_vv g)⁻¹ ∇_v f``; ``FMD`` and ``RMD`` give the exact
  derivative of the unrolled steps; ``Naive`` gives ``∇_u f`` alone.

  Args:
    f: upper objective ``f(u, v, *args) -> scalar``.
    g: lower objective ``g(u, v, *args) -> scalar``.
    u, v0, *args, method, solve, inner_steps, inner_lr, inner, tol, project_v, prox, throw:
      as in ``argmin`` (``throw`` also raises when the linear solve failed).

  Returns:
    ``Hypergradient(grad, v, info)``: the derivative (like ``u``), the inner answer and a
    ``HypergradientInfo``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum((v - 1.0) ** 2)
    >>> g = lambda u, v: jnp.sum((v - u) ** 2) / 2  # v*(u) = u, df/du = 2(u - 1)
    >>> for method in [bilevel.FMD(), bilevel.RMD(), bilevel.CG(5),
    ...                bilevel.ApproxGrad(50), bilevel.Neumann(40)]:
    ...   out = bilevel.hypergradient(f, g, jnp.array([3.0]), jnp.array([0.0]),
    ...                               method=method, inner_steps=50, inner_lr=0.5)
    ...   print(type(method).__name__, out.grad, bool(out.info.converged))
    FMD [4.] True
    RMD [4.] True
    CG [4.] True
    ApproxGrad [4.] True
    Neumann [4.] True
  """
  check_float_leaves(u, "u")
  check_float_leaves(v0, "v0")
  settings = InnerSettings(solve, inner_steps, inner_lr, inner, tol, project_v, prox)
  method, loop, lr = make_loop(method, settings)
  return _hypergradient_jit(f, g, method, loop, bool(throw), u, v0, args, lr)
