r"""Differentiable lower solves: ``argmin``, ``root``, ``fixed_point`` (and ``max_curvature``).

Each solves its lower problem forward (the built-in loop or the user's ``solve=``) and
returns the answer, differentiable in ``u``, in ``args`` and in any traced value the
user's functions close over, the way ``method`` says (see ``_methods.py``). They are
compiled once per (functions, method, settings, shapes): repeated eager calls with the
same function objects do not recompile. ``hypergradient`` is in ``_hypergradient.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from kbeam_jax import derivatives
from kbeam_jax._checks import check_float_leaves, checked_projection
from kbeam_jax._tree import PyTree
from kbeam_jax.bilevel import _lower, _methods, _status


@functools.lru_cache(maxsize=256)
def _projection_prox(project_v: Callable[[PyTree], PyTree]):
  """``project_v`` as a proximal operator (one object per projection: no recompiles)."""
  project = checked_projection(project_v, "v")
  return lambda u, v, step, *args: project(v)


class InnerSettings(NamedTuple):
  """The inner solve's settings as every public function takes them (see ``argmin``);
  ``make_loop`` validates them."""

  solve: Callable[..., PyTree] | None
  inner_steps: int | None
  inner_lr: Any
  inner: optax.GradientTransformation | None
  tol: float | None
  project_v: Callable[[PyTree], PyTree] | None
  prox: Callable[..., PyTree] | None


def make_loop(method, settings: InnerSettings, default_lr=None):
  """``(method, loop, lr)``: ``method`` checked, and the forward solve's settings validated
  with ``project_v`` folded into ``prox``."""
  method = _methods.check_method(method)
  solve, inner_steps, inner_lr, inner, tol, project_v, prox = settings
  if project_v is not None and prox is not None:
    raise ValueError("pass project_v= or prox=, not both (a projection is a prox).")
  if project_v is not None:
    if not callable(project_v):
      raise TypeError(f"project_v must be a function v -> v, got {project_v!r}.")
    prox = _projection_prox(project_v)
  loop, lr = _lower.make_loop(
    method=method,
    inner_steps=inner_steps,
    inner_lr=inner_lr,
    inner=inner,
    tol=tol,
    prox=prox,
    solve=solve,
    default_lr=default_lr,
  )
  return method, loop, lr


def _solve(kind, fn, method, loop, want_info, throw, u, v0, args, lr):
  problem, data, params = _lower.build(kind, fn, loop, u, v0, args, lr)
  v, steps = method.solution(problem, u, v0, data, params)
  if not (want_info or throw):
    return v
  info, start = _status.status(problem, loop, u, v0, v, steps, data, params)
  if throw:
    _status.raise_if_failed(kind, loop, info, start, problem, u, v0, data, params)
  return (v, info) if want_info else v


_solve_jit = jax.jit(_solve, static_argnums=(0, 1, 2, 3, 4, 5))


def _entry(kind, fn, u, v0, args, method, settings, return_info, throw, default_lr=None):
  if not callable(fn):
    raise TypeError(f"{kind.name} needs a function {kind.function}(u, v, *args) first, got {fn!r}.")
  check_float_leaves(u, "u")
  check_float_leaves(v0, "v0")
  method, loop, lr = make_loop(method, settings, default_lr)
  return _solve_jit(kind, fn, method, loop, bool(return_info), bool(throw), u, v0, args, lr)


def argmin(
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
  return_info: bool = False,
  throw: bool = False,
) -> PyTree:
  r"""``v* ≈ argmin_v g(u, v, *args)``, differentiable in ``u`` and ``args`` by ``method``.

  The forward solve is yours or built in:

  * ``solve=``: any ``solve(u, v0, *args) -> v`` (a closed form, an optimistix or jaxopt
    solver, a ``while_loop`` with a tolerance); the implicit methods differentiate its
    answer through the optimality condition ``∇_v g(u, v) = 0`` (the ``custom_root``
    pattern), so ``inner_steps``/``inner_lr`` are not needed;
  * otherwise at most ``inner_steps`` steps from ``v0`` of gradient descent with step
    ``inner_lr`` (a number, an array, a traced value, a schedule ``t -> ρ_t``, or ``"auto"``:
    ``1/λ_max(∇²_vv g)`` at the start by power iteration), or of any optax optimizer
    ``inner=`` (``optax.lbfgs()`` included: the loop passes ``value``, ``grad`` and
    ``value_fn``); with ``tol=`` it stops once ``|∇_v g| <= tol`` (implicit methods only).

  ``project_v`` (a projection onto a convex set) or ``prox`` (``prox(u, v, step, *args)``, the
  proximal operator of ``step·h(u, ·)``) makes it a constrained or composite problem
  ``min_v g + h``: projected / proximal descent forward, and the derivative through the
  fixed point ``v = prox(v - ρ∇_v g, ρ)`` (a non-symmetric system, solved by each method
  accordingly).

  How ``jax.grad``, ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian`` and nested ``jax.grad``
  go through the answer is ``method``'s: ``Naive`` (not at all), ``RMD`` / ``FMD`` (through
  the steps), ``ApproxGrad`` / ``CG`` / ``Neumann`` (implicitly, any order and mode, by a
  ``custom_jvp`` whose linear solve is ``custom_linear_solve``). ``v0`` is a starting
  point: only the unrolled methods differentiate through it.

  Args:
    g: lower objective ``g(u, v, *args) -> scalar``.
    u: upper variable, a pytree of floats.
    v0: initial inner iterate, a pytree of floats.
    *args: extra arguments of ``g`` (a batch, hyperparameters), differentiated too.
    method: ``Naive()``, ``FMD()``, ``RMD(...)``, ``ApproxGrad(...)``, ``CG(...)``,
      ``Neumann(...)`` or your own ``bilevel.Implicit`` subclass.
    solve: your forward solver ``solve(u, v0, *args) -> v``.
    inner_steps: T >= 0, the most inner steps of the built-in loop.
    inner_lr: the inner step size (plain descent), see above.
    inner: instead of ``inner_lr``, an optax optimizer for ``v`` (state fresh per call).
    tol: stop once ``|∇_v g| <= tol`` (the bar of ``info.converged`` too).
    project_v: projection of ``v`` after every step.
    prox: proximal operator ``prox(u, v, step, *args) -> v``.
    return_info: also return a ``SolveInfo`` (``grad_norm``, ``inner_steps``,
      ``converged``, ``finite``, ``diverging``).
    throw: raise at run time (under ``jit`` too, through ``jax.debug.callback``) when the
      solve is not finite, diverged, or missed ``tol``; the message names the cause and the
      fix (``inner_lr 0.5 is above 2/λ_max ≈ 0.12``).

  Returns:
    ``v``, a pytree like ``v0``, or ``(v, SolveInfo)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax import bilevel
    >>> g = lambda u, v: jnp.sum((v - u) ** 2) / 2  # v*(u) = u
    >>> f = lambda u, v: jnp.sum((v - 1.0) ** 2)  # so df/du = 2(u - 1)
    >>> F = lambda u: f(u, bilevel.argmin(g, u, jnp.zeros(1), method=bilevel.CG(20),
    ...                                   inner_steps=50, inner_lr=0.5))
    >>> jax.grad(F)(jnp.array([3.0])), jax.jacfwd(F)(jnp.array([3.0]))
    (Array([4.], dtype=float32), Array([4.], dtype=float32))
    >>> v, info = bilevel.argmin(g, jnp.array([3.0]), jnp.zeros(1), method=bilevel.CG(20),
    ...                          solve=lambda u, v0: u, return_info=True)  # a closed form
    >>> v, bool(info.converged)
    (Array([3.], dtype=float32), True)
  """
  settings = InnerSettings(solve, inner_steps, inner_lr, inner, tol, project_v, prox)
  return _entry(_lower.ARGMIN, g, u, v0, args, method, settings, return_info, throw)


def root(
  F: Callable[..., PyTree],
  u: PyTree,
  v0: PyTree,
  *args: Any,
  method: _methods.Method,
  solve: Callable[..., PyTree] | None = None,
  inner_steps: int | None = None,
  inner_lr: Any = None,
  inner: optax.GradientTransformation | None = None,
  tol: float | None = None,
  return_info: bool = False,
  throw: bool = False,
) -> PyTree:
  r"""``v`` with ``F(u, v, *args) = 0``, differentiated by ``(∂_v F)⁻¹`` (not via ``½|F|²``).

  ``dv/du = -(∂_v F)⁻¹ ∂_u F`` with the method's linear solver on the non-symmetric
  system (``CG`` on the normal equations, ``Neumann`` / ``ApproxGrad`` directly, or yours).
  The built-in forward solve is the damped Richardson iteration ``v ← v - ρF(u, v)``
  (gradient descent when ``F = ∇_v g``), which converges when the eigenvalues of ``∂_v F``
  have positive real parts and ``ρ`` is small enough (``inner_lr="auto"``: ``1/|λ|_max``);
  for anything harder bring ``solve=`` (Newton, an optimistix root finder).

  Args:
    F: ``F(u, v, *args) -> pytree like v``.
    u, v0, *args, method, solve, inner_steps, inner_lr, inner, tol, return_info, throw:
      as in ``argmin``; ``info.grad_norm`` is ``|F(u, v)|``.

  Returns:
    ``v`` (or ``(v, SolveInfo)``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax import bilevel
    >>> F = lambda u, v: jnp.array([[2.0, 1.0], [0.0, 1.0]]) @ v - u  # v* = A⁻¹u
    >>> v = lambda u: bilevel.root(F, u, jnp.zeros(2), method=bilevel.CG(10),
    ...                            inner_steps=100, inner_lr=0.5)
    >>> jnp.round(jax.jacfwd(v)(jnp.ones(2)), 4) + 0.0  # A⁻¹
    Array([[ 0.5, -0.5],
           [ 0. ,  1. ]], dtype=float32)
  """
  settings = InnerSettings(solve, inner_steps, inner_lr, inner, tol, None, None)
  return _entry(_lower.ROOT, F, u, v0, args, method, settings, return_info, throw)


def fixed_point(
  T: Callable[..., PyTree],
  u: PyTree,
  v0: PyTree,
  *args: Any,
  method: _methods.Method,
  solve: Callable[..., PyTree] | None = None,
  inner_steps: int | None = None,
  inner_lr: Any = None,
  inner: optax.GradientTransformation | None = None,
  tol: float | None = None,
  return_info: bool = False,
  throw: bool = False,
) -> PyTree:
  r"""``v = T(u, v, *args)``, differentiated by ``(I - ∂_v T)⁻¹`` with the method's solver.

  The built-in forward solve is the (damped) fixed-point iteration
  ``v ← v + ρ(T(u, v) - v)``, ``ρ = inner_lr`` (1 by default: plain ``v ← T(u, v)``), which
  converges for a contraction.

  Args:
    T: ``T(u, v, *args) -> pytree like v``.
    u, v0, *args, method, solve, inner_steps, inner_lr, inner, tol, return_info, throw:
      as in ``argmin``; ``info.grad_norm`` is ``|T(u, v) - v|``.

  Returns:
    ``v`` (or ``(v, SolveInfo)``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax import bilevel
    >>> T = lambda u, v: 0.5 * v + u  # v* = 2u
    >>> dv_du = jax.grad(lambda u: bilevel.fixed_point(T, u, 0.0, method=bilevel.Neumann(30),
    ...                                                inner_steps=60).sum())(1.0)
    >>> round(float(dv_du), 4)
    2.0
  """
  settings = InnerSettings(solve, inner_steps, inner_lr, inner, tol, None, None)
  return _entry(
    _lower.FIXED_POINT, T, u, v0, args, method, settings, return_info, throw, default_lr=1.0
  )


def max_curvature(
  g: Callable[..., jax.Array], u: PyTree, v: PyTree, *args: Any, power_steps: int = 20
) -> jax.Array:
  r"""``λ_max`` of ``∇²_vv g(u, v, *args)`` by power iteration on Hessian-vector products.

  Gradient descent on ``g`` is stable for ``inner_lr < 2/λ_max``; Neumann's series for
  ``solve_lr < 2/λ_max``; ApproxGrad's descent for ``solve_lr < 2/λ_max²``. (``"auto"``
  takes ``1/λ_max``, or ``1/λ_max²``, from this estimate.) Jit-, vmap- and grad-compatible;
  the estimate approaches ``λ_max`` from below (the magnitude of the extreme eigenvalue
  for an indefinite Hessian).

  Args:
    g: ``g(u, v, *args) -> scalar``.
    u, v: the point.
    *args: extra arguments of ``g``.
    power_steps: Hessian-vector products, >= 1.

  Returns:
    A scalar array (float32 at least).

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax import bilevel
    >>> g = lambda u, v: 0.5 * jnp.sum(jnp.array([1.0, 4.0, 9.0]) * v**2)
    >>> round(float(bilevel.max_curvature(g, None, jnp.zeros(3), power_steps=50)), 3)
    9.0
  """
  check_float_leaves(v, "v")
  return derivatives.max_eigenvalue(lambda x: derivatives.hvp_vv(g, u, v, x, *args), v, power_steps)
