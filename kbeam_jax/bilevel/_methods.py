r"""Hypergradient methods as values, each owning how it differentiates a lower solve.

The protocol (what ``argmin``, ``root``, ``fixed_point``, ``hypergradient`` and the outer
solver call; no module switches on a method's type):

* ``solution(problem, u, v0, data, params) -> (v, steps)``: the forward solve's answer,
  differentiable (in forward and reverse mode) the method's way;
* ``hypergradient(upper, problem, u, v0, data, params, q0)
  -> (value, grad, v, steps, q, linear_residual)``: ``upper(u, v)``'s value and its
  total derivative in ``u`` (by default ``jax.value_and_grad`` through ``solution``);
* ``init_adjoint(v)``: the warm start of the linear solve kept by the outer solver;
* ``unrolled``: it differentiates through the forward solve's steps (so no ``tol``);
  ``remat``: how the built-in loop stores its steps when it is differentiated.

The implicit methods share one rule: at the answer ``F(u, v) = 0`` (``F = ∇_v g``, a root
function, or a fixed-point / proximal residual), so ``dv = -(∂_v F)⁻¹ ∂_u F du``. That is a
``jax.custom_jvp`` whose linear solve is a ``jax.lax.custom_linear_solve``: forward mode
(``jvp``, ``jacfwd``) directly, reverse mode (``grad``, ``vjp``) by transposing it, and any
order (``hessian``, ``grad(grad)``) because the primal answer re-enters the same rule. A new
linear solver is a subclass of ``Implicit`` with one method, ``linear_solve``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kbeam_jax import derivatives
from kbeam_jax._tree import (
  PyTree,
  tree_all_finite,
  tree_axpy,
  tree_scaled_norm,
  tree_sq_norm,
  tree_vdot,
)

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
    return value, grad, v, steps, q0, jnp.zeros([], jnp.result_type(value))

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


@dataclasses.dataclass(frozen=True)
class RMD(Method):
  """Reverse-mode differentiation through the inner steps (autodiff of the loop).

  Every step is rematerialized, so the reverse pass stores only the iterates ``v_t``:
  memory O(V·T). With ``checkpoint=True`` only every ``⌈√T⌉``-th iterate is stored and
  each segment is recomputed in the reverse pass: memory O(V·√T) for one more forward
  pass. Forward mode and higher orders are plain autodiff of the loop too. With your own
  ``solve=``, RMD differentiates through it.

  Attributes:
    checkpoint: store ``⌈√T⌉`` checkpoints instead of every iterate.

  Examples:
    >>> from kbeam_jax import bilevel
    >>> bilevel.RMD(checkpoint=True)
    RMD(checkpoint=True)

  References:
    Maclaurin et al., Gradient-based Hyperparameter Optimization through Reversible
    Learning, ICML 2015; Franceschi et al., ICML 2017.
  """

  unrolled: ClassVar[bool] = True
  checkpoint: bool = False

  def __post_init__(self):
    if not isinstance(self.checkpoint, bool):
      raise ValueError(f"RMD.checkpoint must be a bool, got checkpoint={self.checkpoint!r}.")

  @property
  def remat(self):  # type: ignore[override]
    return "sqrt" if self.checkpoint else "step"

  def solution(self, problem, u, v0, data, params):
    return problem.solve(u, v0, data, params, self.remat)


@dataclasses.dataclass(frozen=True)
class FMD(Method):
  """Forward-mode differentiation through the inner steps.

  Carries the Jacobian ``P_t = dv_t/d(u, v0, args, inner_lr)`` forward (one tangent per
  coordinate of every differentiated input, vmapped), then contracts it with the
  tangents: exact for the unrolled loop, time O(U·V·T), memory O(U·V), independent of T.
  As a ``custom_jvp`` rule whose tangent is linear in the input tangents, it serves
  ``jvp``/``jacfwd`` and, transposed, ``grad``/``vjp`` without storing the trajectory.

  Examples:
    >>> from kbeam_jax import bilevel
    >>> bilevel.FMD()
    FMD()

  References:
    Franceschi et al., Forward and Reverse Gradient-Based Hyperparameter Optimization,
    ICML 2017.
  """

  unrolled: ClassVar[bool] = True

  def solution(self, problem, u, v0, data, params):
    return _fmd(problem, u, v0, data, params)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fmd(problem, u, v0, data, params):
  return problem.solve(u, v0, data, params, None)


def _fmd_jvp(problem, primals, tangents):
  v, steps = _fmd(problem, *primals)  # the primal re-enters the rule at higher orders
  substitute, xs, ts = _perturbed(primals, tangents)
  if not xs:
    return (v, steps), (jax.tree.map(jnp.zeros_like, v), _float0_like(steps))
  x, unravel = ravel_pytree(xs)
  loop = lambda x: problem.solve(*substitute(unravel(x)), None)[0]
  # One forward pass with the tangents of every input coordinate vmapped: dv/dx, (n, ...).
  basis = jnp.eye(x.size, dtype=x.dtype)
  jac = jax.vmap(lambda e: jax.jvp(loop, (x,), (e,))[1])(basis)
  t = ravel_pytree(ts)[0].astype(x.dtype)
  dv = jax.tree.map(lambda J, vi: jnp.tensordot(t, J, axes=1).astype(vi.dtype), jac, v)
  return (v, steps), (dv, _float0_like(steps))


_fmd.defjvp(_fmd_jvp, symbolic_zeros=True)


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
    q = self.linear_solve(vecmat, f_v, q0, symmetric=problem.symmetric)
    q = jax.tree.map(lambda a, b: a.astype(b.dtype), q, f_v)
    grad = jax.tree.map(lambda a, b: (a - b).astype(a.dtype), f_u, pull_u(q)[0])
    r = jax.tree.map(jnp.subtract, vecmat(q), f_v)
    b_norm = tree_scaled_norm(f_v)
    residual = jnp.where(b_norm > 0, tree_scaled_norm(r) / jnp.where(b_norm > 0, b_norm, 1), 0.0)
    return value, grad, v, steps, q, residual

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


def _damped(matvec: MatVec, damping: float) -> MatVec:
  if not damping:
    return matvec
  return lambda x: tree_axpy(damping, x, matvec(x))


def _normal(matvec: MatVec, b: PyTree, symmetric: bool):
  """``(x ↦ AᵀA x, Aᵀ)`` for a non-symmetric ``A``; ``(A, identity)`` for a symmetric one."""
  if symmetric:
    return matvec, lambda x: x
  transpose = jax.linear_transpose(matvec, b)
  At = lambda x: transpose(x)[0]
  return (lambda x: At(matvec(x))), At


@dataclasses.dataclass(frozen=True)
class ApproxGrad(Implicit):
  r"""Implicit hypergradient, the linear system solved by gradient descent.

  ``q`` minimizes ``½|(A + σI)q - b|²`` by ``solve_steps`` descent steps (each two
  products with ``A``); the descent is stable below ``solve_lr < 2 / λ_max(A + σI)²``, and
  ``solve_lr="auto"`` takes ``1 / λ_max²`` (power iteration at the answer). Its condition
  number is the square of ``A``'s: slow on an ill-conditioned lower problem, but it never
  diverges at the auto step and improves with every step. On a singular ``A`` the iterates
  stay in its range and tend to the minimum-norm solution.

  Attributes:
    solve_steps: descent steps on the linear system, >= 1.
    solve_lr: their step size, > 0, or ``"auto"``.
    damping: σ >= 0, Tikhonov damping.

  Examples:
    >>> from kbeam_jax import bilevel
    >>> bilevel.ApproxGrad(solve_steps=50, solve_lr=0.5)
    ApproxGrad(solve_steps=50, solve_lr=0.5, damping=0.0)

  References:
    Mehra & Hamm, Penalty Method for Inversion-Free Deep Bilevel Optimization, ACML 2021
    (the ApproxGrad baseline of Hamm's bilevel work).
  """

  solve_steps: int
  solve_lr: float | str = "auto"
  damping: float = 0.0

  def __post_init__(self):
    _require_int("ApproxGrad", "solve_steps", self.solve_steps, 1)
    _require_number("ApproxGrad", "solve_lr", self.solve_lr, positive=True, auto=True)
    _require_number("ApproxGrad", "damping", self.damping, positive=False)

  def linear_solve(self, matvec, b, x0, *, symmetric):
    A = _damped(matvec, self.damping)
    AtA, At = _normal(A, b, symmetric)
    if self.solve_lr == "auto":
      if symmetric:
        lam = derivatives.max_eigenvalue(A, b) ** 2
      else:
        lam = derivatives.max_eigenvalue(AtA, b)
      lr = jnp.where(lam > 0, 1.0 / lam, 1.0)
    else:
      lr = self.solve_lr

    def body(q, _):  # the gradient of ½|Aq - b|² is Aᵀ(Aq - b)
      r = jax.tree.map(jnp.subtract, A(q), b)
      return tree_axpy(-lr, A(r) if symmetric else At(r), q), None

    q = jax.tree.map(jnp.zeros_like, b) if x0 is None else x0
    return jax.lax.scan(body, q, length=self.solve_steps)[0]

  def failure_hint(self, lam):
    if self.solve_lr != "auto" and self.solve_lr * lam**2 >= 2:
      return (
        f"ApproxGrad's solve_lr {self.solve_lr:g} is above 2/λ_max² ≈ {2 / lam**2:.3g}: "
        'lower it, or pass solve_lr="auto".'
      )
    return super().failure_hint(lam)


@dataclasses.dataclass(frozen=True)
class Neumann(Implicit):
  r"""Implicit hypergradient with ``A⁻¹ b ≈ α Σ_{j=0}^{J} (I - αA)^j b``.

  The truncated Neumann series, ``J = solve_steps``, ``α = solve_lr``, computed as the
  Richardson iteration ``q ← q + α(b - Aq)`` (so it can start from a previous answer). It
  converges when ``0 < α < 2 / λ_max(A)`` and ``A``'s eigenvalues are positive (also for a
  non-symmetric fixed-point condition); ``solve_lr="auto"`` takes ``1 / λ_max`` (power
  iteration at the answer).

  Attributes:
    solve_steps: J, terms of the series after the first, >= 1.
    solve_lr: α > 0, or ``"auto"``.

  Examples:
    >>> from kbeam_jax import bilevel
    >>> bilevel.Neumann(solve_steps=40, solve_lr=0.5)
    Neumann(solve_steps=40, solve_lr=0.5)

  References:
    Lorraine et al., Optimizing Millions of Hyperparameters by Implicit Differentiation,
    AISTATS 2020.
  """

  solve_steps: int
  solve_lr: float | str = "auto"

  def __post_init__(self):
    _require_int("Neumann", "solve_steps", self.solve_steps, 1)
    _require_number("Neumann", "solve_lr", self.solve_lr, positive=True, auto=True)

  def linear_solve(self, matvec, b, x0, *, symmetric):
    if self.solve_lr == "auto":
      lam = derivatives.max_eigenvalue(matvec, b, symmetric=symmetric)
      alpha = jnp.where(lam > 0, 1.0 / lam, 1.0)
    else:
      alpha = self.solve_lr

    def body(q, _):
      r = jax.tree.map(jnp.subtract, b, matvec(q))
      return tree_axpy(alpha, r, q), None

    if x0 is None:  # the first term α b without a product
      return jax.lax.scan(body, jax.tree.map(lambda x: alpha * x, b), length=self.solve_steps)[0]
    return jax.lax.scan(body, x0, length=self.solve_steps + 1)[0]

  def failure_hint(self, lam):
    if self.solve_lr != "auto" and self.solve_lr * lam >= 2:
      return (
        f"Neumann's solve_lr {self.solve_lr:g} is above 2/λ_max ≈ {2 / lam:.3g}: lower it, "
        'or pass solve_lr="auto".'
      )
    return super().failure_hint(lam)


@dataclasses.dataclass(frozen=True)
class CG(Implicit):
  r"""Implicit hypergradient, ``(A + σI) q = b`` solved by conjugate gradient.

  At most ``solve_steps`` iterations; stops once ``|r| <= tol·|b|``. A non-symmetric
  ``A`` (a root, fixed-point or proximal condition) is solved on the normal equations
  ``AᵀA q = Aᵀb``. It cannot lie:

  * ``b`` is scaled to unit size first, so a huge but finite ``b`` (a diverged inner solve
    in float32) gives the huge answer it implies, never an overflowed ``0``; a non-finite
    ``b`` gives a NaN ``q``;
  * on a singular ``A`` whose null space ``b`` has a component in (a continuum of lower
    solutions), plain CG is wrong from its first step and then breaks down. After a
    breakdown (a numerically zero curvature), or when its answer has a larger residual than
    its start (an indefinite ``A`` where the recursion failed), CG solves again on
    the normal equations ``A²q = Ab`` from 0, whose iterates stay in the range of ``A``:
    the minimum-norm answer ``q = A⁺b``, never NaN. The second solve runs only when it
    triggers (inside a ``lax.cond``; under ``vmap``, which runs both branches, a loop of
    zero iterations for the elements that do not need it).

  Attributes:
    solve_steps: the most CG iterations, >= 1.
    tol: relative residual at which CG stops, > 0.
    damping: σ >= 0.
    fallback: the check and the normal-equations solve above; ``False`` gives plain CG
      (wrong on a singular or indefinite ``A``; where the fallback does not trigger both
      cost the same, ``benchmarks/bilevel_scaling.py``).

  Examples:
    >>> from kbeam_jax import bilevel
    >>> bilevel.CG(20)
    CG(solve_steps=20, tol=1e-06, damping=0.0, fallback=True)
  """

  solve_steps: int
  tol: float = 1e-6
  damping: float = 0.0
  fallback: bool = True

  def __post_init__(self):
    _require_int("CG", "solve_steps", self.solve_steps, 1)
    _require_number("CG", "tol", self.tol, positive=True)
    _require_number("CG", "damping", self.damping, positive=False)
    if not isinstance(self.fallback, bool):
      raise ValueError(f"CG.fallback must be a bool, got fallback={self.fallback!r}.")

  def linear_solve(self, matvec, b, x0, *, symmetric):
    # The recursion runs in float32 at least (in bfloat16 its scalars, and the breakdown
    # test relative to the machine epsilon, mean nothing); the products keep b's dtype.
    wide = lambda tree: jax.tree.map(
      lambda x: x.astype(jnp.promote_types(x.dtype, "float32")), tree
    )
    like_b = lambda tree: jax.tree.map(lambda x, y: x.astype(y.dtype), tree, b)
    A = _damped(lambda x: wide(matvec(like_b(x))), self.damping)
    rhs = wide(b)
    if x0 is not None:  # solve for the correction from the warm start
      x0 = wide(x0)
      rhs = jax.tree.map(jnp.subtract, rhs, A(x0))
    A, At = _normal(A, rhs, symmetric)
    rhs = At(rhs)
    # Unit scale: |b|² may overflow where b does not (a diverged float32 inner solve).
    size = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(rhs)]))
    s = jnp.where(jnp.isfinite(size) & (size > 0), size, 1.0)
    rhs = jax.tree.map(lambda x: x / s, rhs)
    q, residual_q, broke_down = conjugate_gradient(A, rhs, self.solve_steps, self.tol)
    finite = tree_all_finite(b)
    if self.fallback and symmetric:
      wrong = broke_down | ~(residual_q <= tree_sq_norm(rhs))  # worse than the start, or NaN

      def minimum_norm():  # q = A⁺b by CG on A²q = Ab from 0
        # Under vmap the cond runs both branches: the loop then takes zero iterations for
        # the elements that do not need it (only A·b is computed for them).
        budget = jnp.where(wrong, self.solve_steps, 0)
        return conjugate_gradient(lambda x: A(A(x)), A(rhs), budget, self.tol)[0]

      # A cond, so that the unbatched common case pays nothing for the fallback (a loop of
      # zero iterations outside a cond measured 34 against 25 ms at V = 10^6).
      q = jax.lax.cond(wrong, minimum_norm, lambda: q)
    q = jax.tree.map(lambda x: x * s, q)
    if x0 is not None:
      q = jax.tree.map(jnp.add, x0, q)
    return like_b(jax.tree.map(lambda x: jnp.where(finite, x, jnp.nan), q))


def conjugate_gradient(
  A: MatVec, b: PyTree, max_iters: int | jax.Array, tol: float
) -> tuple[PyTree, jax.Array, jax.Array]:
  """CG from 0 on a symmetric ``A``; returns ``(q, |r|², broke_down)``, ``r`` the residual
  ``b - Aq`` as CG's recursion tracks it.

  Stops when ``|r| <= tol·|b|`` or after ``max_iters``. A direction ``p`` whose curvature
  ``|pᵀAp| / |p|²`` is below ``1e3·eps`` times the largest seen (numerically a null
  direction: the step would divide by about 0) ends the loop with ``broke_down`` set and
  ``q`` left at the last good iterate. Negative curvature (an indefinite ``A``) does not
  stop it: CG's recursion still solves a non-singular indefinite system (as jaxopt's and
  ``jax.scipy``'s CG do), and a residual that ends worse than the start sends ``CG`` to its
  fallback.
  """
  leaves = jax.tree.leaves(b)
  dtype = jnp.result_type(*leaves)
  tiny = 1e3 * jnp.finfo(dtype).eps
  zero = jnp.zeros([], dtype)
  rr0 = tree_sq_norm(b).astype(dtype)
  stop = (tol**2) * rr0

  def cond(carry):
    i, _, _, _, rr, _, _, broke = carry
    return (i < max_iters) & (rr > stop) & ~broke

  def body(carry):
    i, q, r, p, rr, pp, top, _ = carry
    Ap = A(p)
    pAp = tree_vdot(p, Ap).astype(dtype)
    # pp = |p|² by the recursion |r + βp|² = |r|² + β²|p|² (r ⟂ p in CG): no extra pass.
    curvature = jnp.abs(pAp) / jnp.maximum(pp, jnp.finfo(dtype).tiny)
    top = jnp.maximum(top, curvature)
    broke = ~(curvature > tiny * top) | ~jnp.isfinite(pAp)
    alpha = jnp.where(broke, zero, rr / jnp.where(broke, 1, pAp))
    q = tree_axpy(alpha, p, q)
    r = tree_axpy(-alpha, Ap, r)
    rr_new = tree_sq_norm(r).astype(dtype)
    beta = rr_new / jnp.where(rr > 0, rr, 1)
    p = jax.tree.map(lambda ri, pi: ri + beta.astype(pi.dtype) * pi, r, p)
    pp = rr_new + beta**2 * pp
    return i + 1, q, r, p, jnp.where(broke, rr, rr_new), pp, top, broke

  zeros = jax.tree.map(jnp.zeros_like, b)
  init = (jnp.zeros([], jnp.int32), zeros, b, b, rr0, rr0, zero, jnp.zeros([], bool))
  _, q, _, _, rr, _, _, broke = jax.lax.while_loop(cond, body, init)
  return q, rr, broke


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
