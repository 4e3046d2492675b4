"""The built-in implicit methods, ``ApproxGrad``, ``Neumann`` and ``CG``: their linear solvers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kbeam_jax import derivatives
from kbeam_jax._tree import PyTree, tree_all_finite, tree_axpy, tree_sq_norm, tree_vdot
from kbeam_jax.bilevel._methods import Implicit, MatVec, _require_int, _require_number


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


def _solve_lr_hint(name: str, solve_lr, curvature: float, bound: str) -> str | None:
  """The hint for a fixed ``solve_lr`` at or above its iteration's stable bound
  ``2/curvature`` (written ``bound``); ``None`` when it is below or ``"auto"``."""
  if solve_lr != "auto" and solve_lr * curvature >= 2:
    return (
      f"{name}'s solve_lr {solve_lr:g} is above {bound} ≈ {2 / curvature:.3g}: lower it, or "
      'pass solve_lr="auto".'
    )
  return None


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
    hint = _solve_lr_hint("ApproxGrad", self.solve_lr, lam**2, "2/λ_max²")
    return hint or super().failure_hint(lam)


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
    hint = _solve_lr_hint("Neumann", self.solve_lr, lam, "2/λ_max")
    return hint or super().failure_hint(lam)


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
    zero iterations for the elements that do not need it);
  * it says when the lower problem is not convex at the answer: a search direction ``p``
    with negative curvature ``pᵀ(A + σI)p < 0`` (for ``argmin``, ``A = ∇²_vv g`` is not
    positive definite there: ``v`` is a saddle or a maximum of ``g``, not a minimum) sets
    ``info.negative_curvature`` of ``hypergradient`` and of the outer solver's steps, and
    ``kbeam_jax.run`` then warns once (a ``SolverWarning``). The answer is still the
    implicit formula's, which holds for any invertible ``A``. The test reads the curvature
    each iteration computes anyway (no extra product, no host call), so it sees ``A`` only
    along CG's directions (a negative-definite ``A`` always, an indefinite one when ``b``
    reaches its negative part); a numerically zero curvature is the breakdown above, not
    this flag; the normal equations of a non-symmetric ``A`` (a root, fixed-point or
    ``prox``/``project_v`` condition) are not tested.

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
    return self.linear_solve_info(matvec, b, x0, symmetric=symmetric)[0]

  def linear_solve_info(self, matvec, b, x0, *, symmetric):
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
    q, residual_q, broke_down, negative = conjugate_gradient(A, rhs, self.solve_steps, self.tol)
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
    q = like_b(jax.tree.map(lambda x: jnp.where(finite, x, jnp.nan), q))
    return q, negative if symmetric else jnp.zeros([], bool)  # AᵀA has no negative curvature


def conjugate_gradient(
  A: MatVec, b: PyTree, max_iters: int | jax.Array, tol: float
) -> tuple[PyTree, jax.Array, jax.Array, jax.Array]:
  """CG from 0 on a symmetric ``A``; returns ``(q, |r|², broke_down, negative_curvature)``,
  ``r`` the residual ``b - Aq`` as CG's recursion tracks it.

  Stops when ``|r| <= tol·|b|`` or after ``max_iters``. A direction ``p`` whose curvature
  ``|pᵀAp| / |p|²`` is below ``1e3·eps`` times the largest seen (numerically a null
  direction: the step would divide by about 0) ends the loop with ``broke_down`` set and
  ``q`` left at the last good iterate. Negative curvature (an indefinite ``A``) does not
  stop it: CG's recursion still solves a non-singular indefinite system (as jaxopt's and
  ``jax.scipy``'s CG do), and a residual that ends worse than the start sends ``CG`` to its
  fallback; ``negative_curvature`` records that some direction had ``pᵀAp < 0`` (above the
  breakdown threshold in size): ``A`` is not positive semi-definite.
  """
  leaves = jax.tree.leaves(b)
  dtype = jnp.result_type(*leaves)
  tiny = 1e3 * jnp.finfo(dtype).eps
  zero = jnp.zeros([], dtype)
  rr0 = tree_sq_norm(b).astype(dtype)
  stop = (tol**2) * rr0

  def cond(carry):
    i, _, _, _, rr, _, _, broke, _ = carry
    return (i < max_iters) & (rr > stop) & ~broke

  def body(carry):
    i, q, r, p, rr, pp, top, _, negative = carry
    Ap = A(p)
    pAp = tree_vdot(p, Ap).astype(dtype)
    # pp = |p|² by the recursion |r + βp|² = |r|² + β²|p|² (r ⟂ p in CG): no extra pass.
    curvature = jnp.abs(pAp) / jnp.maximum(pp, jnp.finfo(dtype).tiny)
    top = jnp.maximum(top, curvature)
    broke = ~(curvature > tiny * top) | ~jnp.isfinite(pAp)
    negative = negative | (~broke & (pAp < 0))  # pAp is at hand: the test is free
    alpha = jnp.where(broke, zero, rr / jnp.where(broke, 1, pAp))
    q = tree_axpy(alpha, p, q)
    r = tree_axpy(-alpha, Ap, r)
    rr_new = tree_sq_norm(r).astype(dtype)
    beta = rr_new / jnp.where(rr > 0, rr, 1)
    p = jax.tree.map(lambda ri, pi: ri + beta.astype(pi.dtype) * pi, r, p)
    pp = rr_new + beta**2 * pp
    return i + 1, q, r, p, jnp.where(broke, rr, rr_new), pp, top, broke, negative

  zeros = jax.tree.map(jnp.zeros_like, b)
  no = jnp.zeros([], bool)
  init = (jnp.zeros([], jnp.int32), zeros, b, b, rr0, rr0, zero, no, no)
  _, q, _, _, rr, _, _, broke, negative = jax.lax.while_loop(cond, body, init)
  return q, rr, broke, negative
