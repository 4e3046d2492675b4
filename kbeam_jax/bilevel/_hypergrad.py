r"""Hypergradients of ``u ↦ f(u, v_T(u))`` for ``min_u f(u, v*(u))``, ``v* = argmin_v g``.

The inner solve is T steps of gradient descent ``v_{t+1} = v_t - ρ_t ∇_v g(u, v_t)``
inside ``lax.scan``. The methods differ in how they differentiate through it:

* ``fmd``  forward mode: carries the tangents ``dv_t/du`` (one per coordinate of ``u``,
  vmapped) with ``jvp_grad_v``: exact derivative of the unrolled loop, time O(U·V·T),
  memory O(U·V);
* ``rmd``  reverse mode through the stored trajectory with ``hvp_joint``: the same exact
  derivative, time O(V·T), memory O(V·T), or O(V·√T) with ``checkpoint=True``
  (segments are recomputed during the reverse pass);
* ``approxgrad``, ``cg``, ``neumann``: implicit differentiation at ``v_T``, solving
  ``∇²_vv g · q = ∇_v f`` approximately (descent on ``½|∇²_vv g·q - ∇_v f|²``,
  conjugate gradient, Neumann series), hypergradient ``∇_u f - ∇²_uv g · q``.

Every Hessian product goes through ``kbeam_jax.derivatives``; no Hessian is formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kbeam_jax import derivatives
from kbeam_jax._checks import (
  check_float_leaves,
  check_nonnegative,
  check_steps,
  scalar_output,
)
from kbeam_jax._tree import tree_axpy

PyTree = Any
StepSize = float | Callable[[jax.Array], jax.Array]


class Hypergradient(NamedTuple):
  """A hypergradient estimate and the inner iterate it was computed at."""

  grad: PyTree  # like u
  v: PyTree  # v_T


def _lr(inner_lr: StepSize, t: jax.Array) -> jax.Array:
  return inner_lr(t) if callable(inner_lr) else jnp.asarray(inner_lr)


def _prepare(f, g, u, v, num_steps, inner_lr):
  check_float_leaves(u, "u")
  check_float_leaves(v, "v")
  num_steps = check_steps("num_steps (T)", num_steps)
  check_nonnegative("inner_lr", inner_lr)
  return (
    scalar_output(f, "the upper objective f(u, v)"),
    scalar_output(g, "the lower objective g(u, v)"),
    num_steps,
  )


def inner_solve(g, u, v, args, num_steps: int, inner_lr: StepSize, *, keep: bool = False):
  """T steps of gradient descent on ``g(u, ·)``; optionally keeps ``v_0..v_{T-1}``."""
  grad_v = jax.grad(g, argnums=1)

  def body(v, t):
    v_next = tree_axpy(-_lr(inner_lr, t), grad_v(u, v, *args), v)
    return v_next, (v if keep else None)

  return jax.lax.scan(body, v, jnp.arange(num_steps))


def fmd(f, g, u, v, *args, num_steps: int, inner_lr: StepSize) -> Hypergradient:
  r"""Forward-mode differentiation (FMD) of ``f(u, v_T(u))`` through T descent steps.

  Carries ``P_t = dv_t/du`` forward: ``P_{t+1} = P_t - ρ_t(∇²_vu g + ∇²_vv g P_t)``, one
  column per coordinate of ``u`` (the columns vmapped), and returns
  ``∇_u f + P_Tᵀ ∇_v f``. Memory does not grow with T; time grows with the size of u.

  Args:
    f: upper objective ``f(u, v, *args) -> scalar``.
    g: lower objective ``g(u, v, *args) -> scalar``.
    u: upper variable, a pytree.
    v: initial inner iterate ``v_0``, a pytree (treated as independent of ``u``).
    *args: extra arguments of ``f`` and ``g`` (a batch).
    num_steps: T, inner descent steps.
    inner_lr: ρ, a float or a schedule ``t -> ρ_t``.

  Returns:
    ``Hypergradient(grad, v)``: the derivative (like ``u``) and ``v_T``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum((v - 1.0) ** 2)
    >>> g = lambda u, v: jnp.sum((v - u) ** 2) / 2  # v*(u) = u, df/du = 2(u - 1)
    >>> out = bilevel.fmd(f, g, jnp.array([3.0]), jnp.array([0.0]), num_steps=50, inner_lr=0.5)
    >>> out.grad
    Array([4.], dtype=float32)

  References:
    Franceschi et al., Forward and Reverse Gradient-Based Hyperparameter Optimization,
    ICML 2017.
  """
  f, g, num_steps = _prepare(f, g, u, v, num_steps, inner_lr)
  u_flat, unravel_u = ravel_pytree(u)
  basis = jax.vmap(unravel_u)(jnp.eye(u_flat.size, dtype=u_flat.dtype))
  P0 = jax.vmap(lambda _: jax.tree.map(jnp.zeros_like, v))(jnp.arange(u_flat.size))

  def body(carry, t):
    v, P = carry
    rho = _lr(inner_lr, t)
    grad_v = jax.grad(g, argnums=1)(u, v, *args)
    dP = jax.vmap(lambda du, dv: derivatives.jvp_grad_v(g, u, v, du, dv, *args)[1])(basis, P)
    return (tree_axpy(-rho, grad_v, v), tree_axpy(-rho, dP, P)), None

  (v_T, P), _ = jax.lax.scan(body, (v, P0), jnp.arange(num_steps))
  f_u, f_v = jax.grad(f, argnums=(0, 1))(u, v_T, *args)
  f_v_flat = ravel_pytree(f_v)[0]
  through_v = jax.vmap(lambda p: jnp.dot(ravel_pytree(p)[0], f_v_flat))(P)
  grad = unravel_u(ravel_pytree(f_u)[0] + through_v.astype(u_flat.dtype))
  return Hypergradient(grad, v_T)


def _reverse_step(g, u, args, inner_lr):
  """One step of the reverse recursion at ``(v_t, t)``: ``p -= ρ ∇²_uv g q``,
  ``q -= ρ ∇²_vv g q``."""

  def step(carry, vt):
    p, q = carry
    v_t, t = vt
    rho = _lr(inner_lr, t)
    mixed, hq = derivatives.hvp_joint(g, u, v_t, q, *args)
    return (tree_axpy(-rho, mixed, p), tree_axpy(-rho, hq, q)), None

  return step


def rmd(
  f, g, u, v, *args, num_steps: int, inner_lr: StepSize, checkpoint: bool = False
) -> Hypergradient:
  r"""Reverse-mode differentiation (RMD) of ``f(u, v_T(u))`` through T descent steps.

  Runs the inner loop storing ``v_0..v_{T-1}``, then from ``p = ∇_u f``, ``q = ∇_v f``
  at ``v_T`` goes backwards: ``p ← p - ρ_t ∇²_uv g(v_t)·q``, ``q ← q - ρ_t ∇²_vv g(v_t)·q``
  (both products from one ``hvp_joint``); returns ``p``. Same derivative as ``fmd``.

  With ``checkpoint=True`` only every ``c = ⌈√T⌉``-th iterate is stored and each segment
  is recomputed during the reverse pass: memory O(V·√T) instead of O(V·T), at the cost of
  a second forward pass.

  Args:
    f, g, u, v, *args, num_steps, inner_lr: as in ``fmd``.
    checkpoint: store ``⌈√T⌉`` checkpoints instead of the whole trajectory.

  Returns:
    ``Hypergradient(grad, v)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum((v - 1.0) ** 2)
    >>> g = lambda u, v: jnp.sum((v - u) ** 2) / 2
    >>> bilevel.rmd(f, g, jnp.array([3.0]), jnp.array([0.0]), num_steps=50, inner_lr=0.5,
    ...             checkpoint=True).grad
    Array([4.], dtype=float32)

  References:
    Maclaurin et al., Gradient-based Hyperparameter Optimization through Reversible
    Learning, ICML 2015; Franceschi et al., ICML 2017.
  """
  f, g, num_steps = _prepare(f, g, u, v, num_steps, inner_lr)
  step = _reverse_step(g, u, args, inner_lr)
  if not checkpoint:
    v_T, trajectory = inner_solve(g, u, v, args, num_steps, inner_lr, keep=True)
    p, q = jax.grad(f, argnums=(0, 1))(u, v_T, *args)
    (p, _), _ = jax.lax.scan(step, (p, q), (trajectory, jnp.arange(num_steps)), reverse=True)
    return Hypergradient(p, v_T)

  c = max(1, math.isqrt(max(num_steps - 1, 0)) + 1)  # ⌈√T⌉ for T >= 1
  num_segments = -(-num_steps // c) if num_steps else 0
  grad_v = jax.grad(g, argnums=1)

  def forward(v, t):
    """One inner step, the identity past T (the last segment may be short)."""
    v_next = tree_axpy(-_lr(inner_lr, t), grad_v(u, v, *args), v)
    return jax.tree.map(lambda a, b: jnp.where(t < num_steps, a, b), v_next, v)

  def segment(v, s):
    ts = s * c + jnp.arange(c)
    v_end = jax.lax.fori_loop(0, c, lambda i, v: forward(v, ts[i]), v)
    return v_end, v  # store only the segment's first iterate

  v_T, starts = jax.lax.scan(segment, v, jnp.arange(num_segments))
  p, q = jax.grad(f, argnums=(0, 1))(u, v_T, *args)

  def reverse_segment(carry, start_s):
    v_start, s = start_s
    ts = s * c + jnp.arange(c)
    _, vs = jax.lax.scan(lambda v, t: (forward(v, t), v), v_start, ts)

    def masked(carry, vt):
      new, _ = step(carry, vt)
      return jax.tree.map(lambda a, b: jnp.where(vt[1] < num_steps, a, b), new, carry), None

    return jax.lax.scan(masked, carry, (vs, ts), reverse=True)[0], None

  (p, _), _ = jax.lax.scan(
    reverse_segment, (p, q), (starts, jnp.arange(num_segments)), reverse=True
  )
  return Hypergradient(p, v_T)


def _implicit(f, g, u, v_T, args, solve):
  b = jax.grad(f, argnums=1)(u, v_T, *args)
  q = solve(lambda x: derivatives.hvp_vv(g, u, v_T, x, *args), b)
  f_u = jax.grad(f, argnums=0)(u, v_T, *args)
  return jax.tree.map(jnp.subtract, f_u, derivatives.hvp_uv(g, u, v_T, q, *args))


def approxgrad(
  f,
  g,
  u,
  v,
  *args,
  num_steps: int,
  inner_lr: StepSize,
  solve_steps: int,
  solve_lr: float,
  damping: float = 0.0,
) -> Hypergradient:
  r"""ApproxGrad: implicit hypergradient with the linear system solved by descent.

  After T inner steps, ``q`` minimizes ``½|(∇²_vv g + σI)·q - ∇_v f|²`` by ``solve_steps``
  steps of gradient descent from ``q = 0`` (gradient ``(H + σI)((H + σI)q - ∇_v f)``, two
  Hessian-vector products), and the hypergradient is ``∇_u f - ∇²_uv g · q``.

  Args:
    f, g, u, v, *args, num_steps, inner_lr: as in ``fmd``.
    solve_steps: T_q, descent steps on the linear system.
    solve_lr: step size of that descent; stable below ``2 / λ_max(H + σI)²``.
    damping: σ >= 0, Tikhonov damping of the lower Hessian.

  Returns:
    ``Hypergradient(grad, v)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum((v - 1.0) ** 2)
    >>> g = lambda u, v: jnp.sum((v - u) ** 2) / 2
    >>> bilevel.approxgrad(f, g, jnp.array([3.0]), jnp.array([0.0]), num_steps=50,
    ...                    inner_lr=0.5, solve_steps=50, solve_lr=0.5).grad
    Array([4.], dtype=float32)

  References:
    Mehra & Hamm, Penalty Method for Inversion-Free Deep Bilevel Optimization, ACML 2021
    (the ApproxGrad baseline of Hamm's bilevel work).
  """
  f, g, num_steps = _prepare(f, g, u, v, num_steps, inner_lr)
  solve_steps = check_steps("solve_steps", solve_steps)
  check_nonnegative("damping", damping)
  v_T, _ = inner_solve(g, u, v, args, num_steps, inner_lr)

  def solve(matvec, b):
    A = lambda x: tree_axpy(damping, x, matvec(x))

    def body(q, _):
      r = jax.tree.map(jnp.subtract, A(q), b)
      return tree_axpy(-solve_lr, A(r), q), None

    return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, b), length=solve_steps)[0]

  return Hypergradient(_implicit(f, g, u, v_T, args, solve), v_T)


def cg(
  f,
  g,
  u,
  v,
  *args,
  num_steps: int,
  inner_lr: StepSize,
  solve_steps: int,
  damping: float = 0.0,
  tol: float = 1e-6,
) -> Hypergradient:
  r"""Implicit hypergradient with ``(∇²_vv g + σI)·q = ∇_v f`` solved by conjugate gradient.

  At most ``solve_steps`` iterations of ``jax.scipy.sparse.linalg.cg``, the matrix applied
  by ``hvp_vv``; it stops early once the residual is below ``tol·|∇_v f|``. (With
  ``tol = 0`` float32 CG keeps iterating after it has converged and its step sizes turn
  into 0/0 = NaN.)

  Args:
    f, g, u, v, *args, num_steps, inner_lr: as in ``fmd``.
    solve_steps: the most CG iterations.
    damping: σ >= 0.
    tol: relative residual at which CG stops, > 0.

  Returns:
    ``Hypergradient(grad, v)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum((v - 1.0) ** 2)
    >>> g = lambda u, v: jnp.sum((v - u) ** 2) / 2
    >>> bilevel.cg(f, g, jnp.array([3.0]), jnp.array([0.0]), num_steps=50, inner_lr=0.5,
    ...            solve_steps=5).grad
    Array([4.], dtype=float32)
  """
  f, g, num_steps = _prepare(f, g, u, v, num_steps, inner_lr)
  solve_steps = check_steps("solve_steps", solve_steps)
  check_nonnegative("damping", damping)
  if not tol > 0:
    raise ValueError(f"tol must be > 0 (CG turns NaN when run past convergence), got {tol}.")
  v_T, _ = inner_solve(g, u, v, args, num_steps, inner_lr)

  def solve(matvec, b):
    A = lambda x: tree_axpy(damping, x, matvec(x))
    return jax.scipy.sparse.linalg.cg(A, b, tol=tol, atol=0.0, maxiter=solve_steps)[0]

  return Hypergradient(_implicit(f, g, u, v_T, args, solve), v_T)


def neumann(
  f, g, u, v, *args, num_steps: int, inner_lr: StepSize, solve_steps: int, solve_lr: float
) -> Hypergradient:
  r"""Implicit hypergradient with ``H⁻¹ ∇_v f ≈ α Σ_{j=0}^{J} (I - αH)^j ∇_v f``.

  The truncated Neumann series (``J = solve_steps``, ``α = solve_lr``); converges when
  ``0 < α < 2 / λ_max(∇²_vv g)``.

  Args:
    f, g, u, v, *args, num_steps, inner_lr: as in ``fmd``.
    solve_steps: J, terms of the series after the first.
    solve_lr: α.

  Returns:
    ``Hypergradient(grad, v)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum((v - 1.0) ** 2)
    >>> g = lambda u, v: jnp.sum((v - u) ** 2) / 2
    >>> bilevel.neumann(f, g, jnp.array([3.0]), jnp.array([0.0]), num_steps=50,
    ...                 inner_lr=0.5, solve_steps=40, solve_lr=0.5).grad
    Array([4.], dtype=float32)

  References:
    Lorraine et al., Optimizing Millions of Hyperparameters by Implicit Differentiation,
    AISTATS 2020.
  """
  f, g, num_steps = _prepare(f, g, u, v, num_steps, inner_lr)
  solve_steps = check_steps("solve_steps", solve_steps)
  v_T, _ = inner_solve(g, u, v, args, num_steps, inner_lr)

  def solve(matvec, b):
    def body(carry, _):
      term, total = carry
      term = tree_axpy(-solve_lr, matvec(term), term)
      return (term, jax.tree.map(jnp.add, total, term)), None

    (_, total), _ = jax.lax.scan(body, (b, b), length=solve_steps)
    return jax.tree.map(lambda x: solve_lr * x, total)

  return Hypergradient(_implicit(f, g, u, v_T, args, solve), v_T)
