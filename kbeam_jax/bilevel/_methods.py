r"""Hypergradient methods as values: how ``v_T(u)`` is differentiated, or how ``u`` moves.

Each method is an immutable, hashable dataclass, validated when it is built, so that
``bilevel.argmin``, ``bilevel.hypergradient``, ``bilevel.solver`` and
``bilevel.scale_by_hypergradient`` all take the same ``method=`` value and a loop over
methods needs no per-method argument sets:

* ``Naive()``   ``v_T`` treated as a constant: only ``∇_u f`` (the implicit term dropped);
* ``FMD()``     forward mode through the T inner steps (carries ``dv_t/du``);
* ``RMD(checkpoint=False)`` reverse mode through the T inner steps (autodiff of the
  loop; with ``checkpoint=True`` only ``⌈√T⌉`` iterates are stored);
* ``ApproxGrad(solve_steps, solve_lr, damping=0)``, ``CG(solve_steps, tol, damping)``,
  ``Neumann(solve_steps, solve_lr)``: implicit differentiation at ``v_T``, the linear
  system ``∇²_vv g · q = ∇_v f`` solved by descent on ``½|Hq - b|²``, by conjugate
  gradient, or by a truncated Neumann series;
* ``Penalty(...)``: no hypergradient at all: the inversion-free penalty method of
  Mehra & Hamm (only in ``bilevel.solver`` / ``scale_by_hypergradient``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kbeam_jax._tree import tree_all_finite, tree_axpy, tree_sq_norm, tree_vdot

PyTree = Any
MatVec = Callable[[PyTree], PyTree]


def _require_int(owner: str, name: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {name}={value!r}.")


def _require_number(owner: str, name: str, value: Any, *, positive: bool) -> None:
  ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > 0 if positive else value >= 0)
  if not ok:
    bound = "> 0" if positive else ">= 0"
    raise ValueError(f"{owner}.{name} must be a finite number {bound}, got {name}={value!r}.")


class Method:
  """Base class of the hypergradient methods (for ``isinstance`` checks)."""


@dataclasses.dataclass(frozen=True)
class Naive(Method):
  """``v_T`` as a constant: the hypergradient is ``∇_u f(u, v_T)`` alone.

  The baseline that ignores how ``v*`` moves with ``u`` (the implicit term
  ``-∇²_uv g (∇²_vv g)⁻¹ ∇_v f`` is dropped).

  Example:
    >>> from kbeam_jax import bilevel
    >>> bilevel.Naive()
    Naive()
  """


@dataclasses.dataclass(frozen=True)
class FMD(Method):
  """Forward-mode differentiation through the T inner steps.

  Carries the Jacobian ``P_t = dv_t/du`` (one tangent per coordinate of ``u`` and of every
  differentiated ``args`` leaf, vmapped): exact for the unrolled loop, time O(U·V·T),
  memory O(U·V), independent of T.

  Example:
    >>> from kbeam_jax import bilevel
    >>> bilevel.FMD()
    FMD()

  References:
    Franceschi et al., Forward and Reverse Gradient-Based Hyperparameter Optimization,
    ICML 2017.
  """


@dataclasses.dataclass(frozen=True)
class RMD(Method):
  """Reverse-mode differentiation through the T inner steps (autodiff of the loop).

  Every step is rematerialized, so the reverse pass stores only the iterates ``v_t``:
  memory O(V·T). With ``checkpoint=True`` only every ``⌈√T⌉``-th iterate is stored and
  each segment is recomputed in the reverse pass: memory O(V·√T) for one more forward
  pass.

  Attributes:
    checkpoint: store ``⌈√T⌉`` checkpoints instead of every iterate.

  Example:
    >>> from kbeam_jax import bilevel
    >>> bilevel.RMD(checkpoint=True)
    RMD(checkpoint=True)

  References:
    Maclaurin et al., Gradient-based Hyperparameter Optimization through Reversible
    Learning, ICML 2015; Franceschi et al., ICML 2017.
  """

  checkpoint: bool = False

  def __post_init__(self):
    if not isinstance(self.checkpoint, bool):
      raise ValueError(f"RMD.checkpoint must be a bool, got checkpoint={self.checkpoint!r}.")


class Implicit(Method):
  """Implicit differentiation at ``v_T``: solves ``(∇²_vv g + σI) q = ∇_v f``."""

  def solve(self, matvec: MatVec, b: PyTree) -> PyTree:
    """Approximates ``q = (H + σI)⁻¹ b`` with ``matvec(x) = H x``."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class ApproxGrad(Implicit):
  r"""Implicit hypergradient, the linear system solved by gradient descent.

  ``q`` minimizes ``½|(H + σI)q - b|²`` by ``solve_steps`` descent steps from 0 (each
  step two Hessian-vector products); the descent is stable below
  ``solve_lr < 2 / λ_max(H + σI)²``. On a singular ``H`` the iterates stay in the range
  of ``H`` and tend to the minimum-norm solution.

  Attributes:
    solve_steps: descent steps on the linear system, >= 1.
    solve_lr: their step size, > 0.
    damping: σ >= 0, Tikhonov damping of the lower Hessian.

  Example:
    >>> from kbeam_jax import bilevel
    >>> bilevel.ApproxGrad(solve_steps=50, solve_lr=0.5)
    ApproxGrad(solve_steps=50, solve_lr=0.5, damping=0.0)

  References:
    Mehra & Hamm, Penalty Method for Inversion-Free Deep Bilevel Optimization, ACML 2021
    (the ApproxGrad baseline of Hamm's bilevel work).
  """

  solve_steps: int
  solve_lr: float
  damping: float = 0.0

  def __post_init__(self):
    _require_int("ApproxGrad", "solve_steps", self.solve_steps, 1)
    _require_number("ApproxGrad", "solve_lr", self.solve_lr, positive=True)
    _require_number("ApproxGrad", "damping", self.damping, positive=False)

  def solve(self, matvec, b):
    A = _damped(matvec, self.damping)

    def body(q, _):
      r = jax.tree.map(jnp.subtract, A(q), b)
      return tree_axpy(-self.solve_lr, A(r), q), None

    return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, b), length=self.solve_steps)[0]


@dataclasses.dataclass(frozen=True)
class Neumann(Implicit):
  r"""Implicit hypergradient with ``H⁻¹ b ≈ α Σ_{j=0}^{J} (I - αH)^j b``.

  The truncated Neumann series, ``J = solve_steps``, ``α = solve_lr``; it converges when
  ``0 < α < 2 / λ_max(H)`` and ``H`` is positive definite.

  Attributes:
    solve_steps: J, terms of the series after the first, >= 1.
    solve_lr: α > 0.

  Example:
    >>> from kbeam_jax import bilevel
    >>> bilevel.Neumann(solve_steps=40, solve_lr=0.5)
    Neumann(solve_steps=40, solve_lr=0.5)

  References:
    Lorraine et al., Optimizing Millions of Hyperparameters by Implicit Differentiation,
    AISTATS 2020.
  """

  solve_steps: int
  solve_lr: float

  def __post_init__(self):
    _require_int("Neumann", "solve_steps", self.solve_steps, 1)
    _require_number("Neumann", "solve_lr", self.solve_lr, positive=True)

  def solve(self, matvec, b):
    alpha = self.solve_lr

    def body(carry, _):
      term, total = carry
      term = tree_axpy(-alpha, matvec(term), term)
      return (term, jax.tree.map(jnp.add, total, term)), None

    (_, total), _ = jax.lax.scan(body, (b, b), length=self.solve_steps)
    return jax.tree.map(lambda x: alpha * x, total)


@dataclasses.dataclass(frozen=True)
class CG(Implicit):
  r"""Implicit hypergradient, ``(H + σI) q = b`` solved by conjugate gradient.

  At most ``solve_steps`` iterations; stops once ``|r| <= tol·|b|``. It cannot lie:

  * a non-finite ``b`` (a diverged inner solve) gives a NaN ``q``, so a NaN
    hypergradient, never the plausible ``q = 0``;
  * on a singular ``H`` whose null space ``b`` has a component in (a continuum of lower
    solutions), plain CG is wrong from its first step and then breaks down. After a
    breakdown (zero or negative curvature: also an indefinite ``H``, a non-convex lower
    problem), or when its answer has a larger residual ``|b - Hq|`` than ``q = 0`` (the
    residual as CG's recursion tracks it), CG
    solves again on the normal equations ``H²q = Hb`` from 0, whose iterates stay in the
    range of ``H``: the minimum-norm answer ``q = H⁺b``, never NaN. The check costs no
    product; the second solve (two products per iteration, the condition number squared)
    runs only when it triggers (under ``vmap`` its right-hand side ``Hb`` is computed in
    any case, and its loop runs zero iterations where it is not needed).

  Attributes:
    solve_steps: the most CG iterations, >= 1.
    tol: relative residual at which CG stops, > 0 (with 0, float32 CG keeps iterating
      past convergence and its step sizes turn into 0/0).
    damping: σ >= 0.
    fallback: the check and the normal-equations solve above. ``False`` gives plain CG,
      wrong on a singular or indefinite ``H`` but faster: the extra control flow around
      the Hessian-vector products measured 68 against 50 ms for a whole hypergradient at
      V = 10^6 (``benchmarks/bilevel_scaling.py``'s separable problem, CPU), and 5.6
      against 4.7 ms at V = 10^5; no difference on its MLP problem.

  Example:
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

  def solve(self, matvec, b):
    # The CG recursion runs in float32 at least (in bfloat16 its scalars, and the breakdown
    # test relative to the machine epsilon, mean nothing); the products keep b's dtype.
    wide = lambda tree: jax.tree.map(
      lambda x: x.astype(jnp.promote_types(x.dtype, "float32")), tree
    )
    like_b = lambda tree: jax.tree.map(lambda x, y: x.astype(y.dtype), tree, b)
    A = _damped(lambda x: wide(matvec(like_b(x))), self.damping)
    rhs = wide(b)
    q, residual_q, broke_down = conjugate_gradient(A, rhs, self.solve_steps, self.tol)
    finite = tree_all_finite(b)
    if not self.fallback:
      return like_b(jax.tree.map(lambda x: jnp.where(finite, x, jnp.nan), q))
    wrong = broke_down | ~(residual_q <= tree_sq_norm(rhs))  # worse than q = 0, or NaN
    # q = H⁺b by CG on the normal equations H²q = Hb from 0, with zero iterations unless
    # needed (a while loop, not a cond: under vmap a cond would run both branches).
    budget = jnp.where(wrong, self.solve_steps, 0)
    Ab = jax.lax.cond(wrong, lambda: A(rhs), lambda: jax.tree.map(jnp.zeros_like, rhs))
    q2, _, _ = conjugate_gradient(lambda x: A(A(x)), Ab, budget, self.tol)
    q = jax.tree.map(lambda a, c: jnp.where(wrong, a, c), q2, q)
    return like_b(jax.tree.map(lambda x: jnp.where(finite, x, jnp.nan), q))


def conjugate_gradient(
  A: MatVec, b: PyTree, max_iters: int | jax.Array, tol: float
) -> tuple[PyTree, jax.Array, jax.Array]:
  """CG from 0 on a symmetric ``A``; returns ``(q, |r|², broke_down)``, ``r`` the residual
  ``b - Aq`` as CG's recursion tracks it.

  Stops when ``|r| <= tol·|b|`` or after ``max_iters``. A direction ``p`` whose curvature
  ``pᵀAp / |p|²`` is not positive, or below ``1e3·eps`` times the largest curvature seen
  (numerically a null direction), ends the loop with ``broke_down`` set and ``q`` left at
  the last good iterate.
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
    curvature = pAp / jnp.maximum(pp, jnp.finfo(dtype).tiny)
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


def _damped(matvec: MatVec, damping: float) -> MatVec:
  if not damping:
    return matvec
  return lambda x: tree_axpy(damping, x, matvec(x))


@dataclasses.dataclass(frozen=True)
class Penalty(Method):
  r"""The penalty method (Mehra & Hamm, ACML 2021): no inverse, no unrolling.

  Replaces ``v ∈ argmin g`` by ``∇_v g = 0`` enforced by a growing penalty, minimizing
  jointly ``L_γ = f + νᵀ∇_v g + (γ/2)|∇_v g|²``: each outer step takes ``num_steps``
  steps of the inner optimizer on ``L_γ + λg`` in ``v``, then one step on ``u`` along
  ``∇_u L``. When ``|∇L|² < ε²`` (measured where ``u``'s gradient is taken) the schedule
  tightens: ``γ ← min(c_γ γ, γ_max)``, ``ε ← c_ε ε`` and, augmented,
  ``ν ← ν + γ∇_v g``.

  Attributes:
    gamma: γ_0 > 0.
    epsilon: ε_0 > 0.
    gamma_factor: c_γ >= 1.
    epsilon_factor: c_ε in (0, 1].
    max_gamma: γ_max >= γ_0 (may be ``inf``). Plain steps on ``L_γ`` are stable only
      while ``ρ γ λ_max(∇²_vv g)² < 2``: with a fixed inner step, cap γ.
    lower_weight: λ >= 0, weight of ``g`` added to ``v``'s objective.
    augmented: add the multiplier term ``νᵀ∇_v g`` (augmented Lagrangian).
    warmup_steps: extra steps on ``v`` in the first outer step, before ``u`` moves.
    divergence_steps: ``info.diverging`` turns true once ``|∇_v g|`` has risen this many
      steps in a row to above its value after the first step (or ``v`` is not finite).

  Example:
    >>> from kbeam_jax import bilevel
    >>> bilevel.Penalty(gamma=10.0, max_gamma=100.0).gamma
    10.0

  References:
    Mehra & Hamm, Penalty Method for Inversion-Free Deep Bilevel Optimization, ACML 2021.
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
    _require_number("Penalty", "gamma", self.gamma, positive=True)
    _require_int("Penalty", "divergence_steps", self.divergence_steps, 1)
    _require_number("Penalty", "epsilon", self.epsilon, positive=True)
    _require_number("Penalty", "lower_weight", self.lower_weight, positive=False)
    _require_int("Penalty", "warmup_steps", self.warmup_steps, 0)
    if not (isinstance(self.gamma_factor, int | float) and self.gamma_factor >= 1):
      raise ValueError(f"Penalty.gamma_factor must be >= 1, got {self.gamma_factor!r}.")
    if not (isinstance(self.epsilon_factor, int | float) and 0 < self.epsilon_factor <= 1):
      raise ValueError(f"Penalty.epsilon_factor must be in (0, 1], got {self.epsilon_factor!r}.")
    if not (isinstance(self.max_gamma, int | float) and self.max_gamma >= self.gamma):
      raise ValueError(
        f"Penalty.max_gamma must be >= gamma={self.gamma} (inf for no cap), got "
        f"max_gamma={self.max_gamma!r}."
      )
    if not isinstance(self.augmented, bool):
      raise ValueError(f"Penalty.augmented must be a bool, got {self.augmented!r}.")


METHODS = (Naive, FMD, RMD, ApproxGrad, CG, Neumann, Penalty)


def check_method(method: Any, *, penalty_ok: bool) -> Method:
  """Returns ``method`` if it is a method value, else raises naming the choices."""
  if isinstance(method, type) and issubclass(method, Method):
    raise TypeError(
      f"method must be a method value, not the class: write bilevel.{method.__name__}(...)."
    )
  if type(method) not in METHODS:
    names = ", ".join(f"bilevel.{m.__name__}(...)" for m in METHODS)
    raise TypeError(f"method must be one of {names}; got {method!r}.")
  if isinstance(method, Penalty) and not penalty_ok:
    raise TypeError(
      "the penalty method computes no hypergradient and no argmin: use it as the method "
      "of bilevel.solver(...) or bilevel.scale_by_hypergradient(...)."
    )
  return method
