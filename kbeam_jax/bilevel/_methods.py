r"""The method protocol: base classes ``Method`` and ``Implicit``, ``Naive``, ``check_method``.

A hypergradient method is a value that owns how it differentiates a lower solve. The
protocol (what ``argmin``, ``root``, ``fixed_point``, ``hypergradient`` and the outer solver
call; no module switches on a method's type):

* ``solution(problem, u, v0, data, params) -> (v, steps)``: the forward solve's answer,
  differentiable (in forward and reverse mode) the method's way;
* ``hypergradient(upper, problem, u, v0, data, params, q0)
  -> (value, grad, v, steps, q, linear_residual, negative_curvature)``: ``upper(u, v)``'s
  value and its total derivative in ``u`` (by default ``jax.value_and_grad`` through
  ``solution``), with the linear solve's status (0 and ``False`` without one);
* ``init_adjoint(v)``: the warm start of the linear solve kept by the outer solver;
* ``unrolled``: it differentiates through the forward solve's steps (so no ``tol``);
  ``remat``: how the built-in loop stores its steps when it is differentiated.

The implicit methods share one rule: at the answer ``F(u, v) = 0`` (``F = ∇_v g``, a root
function, or a fixed-point / proximal residual), so ``dv = -(∂_v F)⁻¹ ∂_u F du``. That is a
``jax.custom_jvp`` whose linear solve is a ``jax.lax.custom_linear_solve``: forward mode
(``jvp``, ``jacfwd``) directly, reverse mode (``grad``, ``vjp``) by transposing it, and any
order (``hessian``, ``grad(grad)``) because the primal answer re-enters the same rule. A new
linear solver is a subclass of ``Implicit`` with one method, ``linear_solve``.

The unrolled methods (``RMD``, ``FMD``) are in ``_unrolled.py``; the built-in implicit ones
(``ApproxGrad``, ``Neumann``, ``CG``) in ``_linear_solvers.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kbeam_jax._tree import PyTree, tree_all_finite, tree_scaled_norm

MatVec = Any  # Callable[[PyTree], PyTree]


def _require_int(owner: str, name: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
    raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {name}={value!r}.")


def _require_number(owner: str, name: str, value: Any, *, positive: bool, auto=False) -> None:
  if auto and value == "auto":
    return
  ok = isinstance(value, int | float | np.number) and not isinstance(value, bool)
  ok = ok and math.isfinite(value) and (value > 0 if positive else value >= 0)
  if not ok:
    bound = "> 0" if positive else ">= 0"
    extra = ' or "auto"' if auto else ""
    raise ValueError(
      f"{owner}.{name} must be a finite number {bound}{extra}, got {name}={value!r}."
    )


class Method:
  """Base class of the hypergradient methods: the protocol above, with defaults."""

  unrolled: ClassVar[bool] = False
  remat: ClassVar[str | None] = None

  def solution(self, problem, u, v0, data, params):
    raise NotImplementedError(f"{type(self).__name__} does not define solution().")

  def hypergradient(self, upper, problem, u, v0, data, params, q0):
    def total(u):
      v, steps = self.solution(problem, u, v0, data, params)
      return upper(u, v), (v, steps)

    (value, (v, steps)), grad = jax.value_and_grad(total, has_aux=True)(u)
    return value, grad, v, steps, q0, jnp.zeros([], jnp.result_type(value)), jnp.zeros([], bool)

  def init_adjoint(self, v):
    del v
    return None  # no linear solve to warm-start


def _float0_like(x):
  return np.zeros(jnp.shape(x), jax.dtypes.float0)


def _perturbed(primals, tangents):
  """``(leaves, substitute, xs, ts)``: the inexact primal leaves whose tangent is not a
  symbolic zero, their tangents, and ``substitute(xs)`` rebuilding the primals with them."""
  zero = jax.custom_derivatives.SymbolicZero
  leaves, treedef = jax.tree.flatten(primals)
  dleaves = jax.tree.leaves(tangents, is_leaf=lambda t: isinstance(t, zero))
  which = [
    i
    for i, (x, t) in enumerate(zip(leaves, dleaves, strict=True))
    if not isinstance(t, zero) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]

  def substitute(xs):
    new = list(leaves)
    for i, x in zip(which, xs, strict=True):
      new[i] = x
    return jax.tree.unflatten(treedef, new)

  return substitute, [leaves[i] for i in which], [dleaves[i] for i in which]


@dataclasses.dataclass(frozen=True)
class Naive(Method):
  """``v_T`` as a constant: the hypergradient is ``∇_u f(u, v_T)`` alone.

  The baseline that ignores how ``v*`` moves with ``u`` (the implicit term
  ``-∇²_uv g (∇²_vv g)⁻¹ ∇_v f`` is dropped).

  Examples:
    >>> from kbeam_jax import bilevel
    >>> bilevel.Naive()
    Naive()
  """

  def solution(self, problem, u, v0, data, params):
    v, steps = problem.solve(u, v0, data, params, None)
    return jax.lax.stop_gradient(v), steps


class Implicit(Method):
  r"""Implicit differentiation at the answer: ``dv = -(∂_v F)⁻¹ ∂_u F du``.

  A subclass defines one method, ``linear_solve(matvec, b, x0, *, symmetric) -> x``, an
  approximate solution of ``A x = b`` for the linear map ``matvec(x) = A x`` (on pytrees
  like ``b``), started from ``x0`` (``None``: from 0). ``symmetric`` says whether ``A`` is
  symmetric (``∇²_vv g``); otherwise it is ``∂_v F`` of a root, fixed-point or proximal
  condition (``jax.linear_transpose(matvec, b)`` gives ``Aᵀ`` when the solver needs it).
  Subclasses are frozen dataclasses (hashable: a static argument of the compiled code).

  Example, a diagonally preconditioned CG from ``jax.scipy``:

    >>> import dataclasses, jax, jax.numpy as jnp
    >>> from kbeam_jax import bilevel
    >>> @dataclasses.dataclass(frozen=True)
    ... class JacobiCG(bilevel.Implicit):
    ...   diagonal: tuple  # the diagonal of the Hessian, or an estimate
    ...   def linear_solve(self, matvec, b, x0, *, symmetric):
    ...     M = lambda r: r / jnp.asarray(self.diagonal)
    ...     return jax.scipy.sparse.linalg.cg(matvec, b, x0, M=M, maxiter=20)[0]
    >>> a = jnp.array([1.0, 100.0])
    >>> g = lambda u, v: 0.5 * jnp.sum(a * v**2) - u @ v  # v* = u / a
    >>> f = lambda u, v: jnp.sum(v)
    >>> bilevel.hypergradient(f, g, jnp.ones(2), jnp.zeros(2), method=JacobiCG((1.0, 100.0)),
    ...                       inner_steps=2000, inner_lr=0.01).grad
    Array([1.  , 0.01], dtype=float32)
  """

  def linear_solve(self, matvec: MatVec, b: PyTree, x0: PyTree | None, *, symmetric: bool):
    raise NotImplementedError(
      f"{type(self).__name__} must define linear_solve(matvec, b, x0, *, symmetric)."
    )

  def linear_solve_info(self, matvec: MatVec, b: PyTree, x0: PyTree | None, *, symmetric: bool):
    """``(x, negative_curvature)``: ``linear_solve``'s answer and whether the solver met a
    direction ``p`` with ``pᵀAp < 0`` (a symmetric ``A`` that is not positive semi-definite).
    ``False`` unless a subclass looks (``CG`` does); the hypergradient reports it."""
    return self.linear_solve(matvec, b, x0, symmetric=symmetric), jnp.zeros([], bool)

  def tangent_solve(self, matvec: MatVec, b: PyTree, symmetric: bool) -> PyTree:
    """``A⁻¹ b`` as a ``custom_linear_solve``: differentiable and transposable."""
    solve = lambda mv, rhs: self.linear_solve(mv, rhs, None, symmetric=symmetric)
    return jax.lax.custom_linear_solve(matvec, b, solve, transpose_solve=solve, symmetric=symmetric)

  def solution(self, problem, u, v0, data, params):
    return _implicit(self, problem, u, v0, data, params)

  def hypergradient(self, upper, problem, u, v0, data, params, q0):
    # The adjoint form of the same rule: (∂_v F)ᵀ q = ∇_v f, grad = ∇_u f - (∂_u F)ᵀ q.
    v, steps = self.solution(problem, u, v0, data, params)
    v = jax.lax.stop_gradient(v)
    value, (f_u, f_v) = jax.value_and_grad(upper, argnums=(0, 1))(u, v)
    condition_u = lambda u_: problem.condition(u_, v, data, params)
    _, pull_u = jax.vjp(condition_u, u)
    _, pull_v = jax.vjp(lambda v_: problem.condition(u, v_, data, params), v)
    vecmat = lambda x: pull_v(x)[0]
    if q0 is not None:
      # The warm start only where it is better than 0 (a smaller residual): a solve that
      # diverged before (an unstable solve_lr) then cannot compound from step to step.
      r0 = jax.tree.map(jnp.subtract, vecmat(q0), f_v)
      ok = tree_all_finite(q0) & (tree_scaled_norm(r0) < tree_scaled_norm(f_v))
      q0 = jax.tree.map(lambda x: jnp.where(ok, x, jnp.zeros_like(x)), q0)
    q, negative_curvature = self.linear_solve_info(vecmat, f_v, q0, symmetric=problem.symmetric)
    q = jax.tree.map(lambda a, b: a.astype(b.dtype), q, f_v)
    grad = jax.tree.map(lambda a, b: (a - b).astype(a.dtype), f_u, pull_u(q)[0])
    r = jax.tree.map(jnp.subtract, vecmat(q), f_v)
    b_norm = tree_scaled_norm(f_v)
    residual = jnp.where(b_norm > 0, tree_scaled_norm(r) / jnp.where(b_norm > 0, b_norm, 1), 0.0)
    return value, grad, v, steps, q, residual, jnp.asarray(negative_curvature, bool)

  def init_adjoint(self, v):
    return jax.tree.map(jnp.zeros_like, v)

  def failure_hint(self, lam: float) -> str:
    """What to change when the linear solve diverged, ``lam`` ≈ ``λ_max`` of its matrix."""
    del lam
    return "check that the lower problem is strongly convex at the answer (or add damping)."


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _implicit(method, problem, u, v0, data, params):
  return problem.solve(u, v0, data, params, None)


def _implicit_jvp(method, problem, primals, tangents):
  u, v0, data, params = primals
  v, steps = _implicit(method, problem, u, v0, data, params)  # re-enters at higher orders
  # ∂_(u, data) F · (du, ddata), in the inputs that are perturbed only
  substitute, xs, ts = _perturbed((u, data), (tangents[0], tangents[2]))
  if not xs:
    return (v, steps), (jax.tree.map(jnp.zeros_like, v), _float0_like(steps))

  def condition_at(*xs):
    u_, data_ = substitute(xs)
    return problem.condition(u_, v, data_, params)

  rhs = jax.jvp(condition_at, xs, ts)[1]
  # Every leaf of the right-hand side linear in the tangents, even one that does not depend
  # on them (a bias the perturbed input does not reach): custom_linear_solve's transpose
  # rule requires it (nested argmins differentiated in reverse mode hit this).
  anchor = 0.0 * sum(jnp.sum(t) for t in ts)
  rhs = jax.tree.map(lambda r: r + anchor.astype(r.dtype), rhs)
  matvec = lambda x: jax.jvp(lambda v_: problem.condition(u, v_, data, params), (v,), (x,))[1]
  dv = method.tangent_solve(matvec, jax.tree.map(jnp.negative, rhs), problem.symmetric)
  dv = jax.tree.map(lambda a, b: a.astype(jnp.result_type(b)), dv, v)
  return (v, steps), (dv, _float0_like(steps))


_implicit.defjvp(_implicit_jvp, symbolic_zeros=True)


def check_method(method: Any) -> Method:
  """Returns ``method`` if it is a method value, else raises naming the choices."""
  if isinstance(method, type) and issubclass(method, Method):
    raise TypeError(
      f"method must be a method value, not the class: write bilevel.{method.__name__}(...)."
    )
  if not isinstance(method, Method) or type(method) in (Method, Implicit):
    raise TypeError(
      "method must be a hypergradient method value: bilevel.Naive(), FMD(), RMD(...), "
      "ApproxGrad(...), CG(...), Neumann(...), or your own subclass of bilevel.Implicit "
      f"(one method, linear_solve); got {method!r}. The penalty method is its own solver: "
      "bilevel.penalty(...)."
    )
  try:
    hash(method)
  except TypeError as e:
    raise TypeError(
      f"method must be hashable (a frozen dataclass), got {method!r}: {e}. Declare it with "
      "@dataclasses.dataclass(frozen=True) and keep arrays out of its fields (tuples work)."
    ) from e
  return method
