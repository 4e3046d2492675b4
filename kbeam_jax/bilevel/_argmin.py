r"""A differentiable ``argmin`` and the one ``hypergradient``.

``argmin(g, u, v0, *args, method=...)`` runs T steps of an optax optimizer on
``g(u, ·, *args)`` from ``v0`` and returns ``v_T``; how ``jax.grad`` goes through it is the
method's choice:

* ``Naive``: not at all (``v_T`` is a constant);
* ``RMD``: autodiff of the loop, every step rematerialized (only the iterates are
  stored), or ``⌈√T⌉`` segments with ``checkpoint=True``;
* ``FMD``: a ``custom_vjp`` whose forward pass carries the Jacobian ``dv_T/d(u, args)``
  in forward mode and whose backward pass contracts it with the cotangent;
* ``ApproxGrad``, ``CG``, ``Neumann``: a ``custom_vjp`` whose backward pass solves
  ``∇²_vv g · q = v̄`` (Hessian-vector products at ``v_T``) and returns
  ``-∇²_uv g · q`` for ``u`` (and the same vector-Jacobian product for ``args``).

So ``jax.grad(lambda u: f(u, argmin(g, u, v0, method=m, ...)))`` is the hypergradient of
method ``m``, and ``hypergradient`` is exactly that, with ``v_T`` returned beside it.
Both are compiled once per (objective, method, settings, shapes): repeated eager calls
do not recompile (pass the same function objects).
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
from jax.flatten_util import ravel_pytree

from kbeam_jax import derivatives
from kbeam_jax._checks import check_float_leaves, check_steps, scalar_output
from kbeam_jax.bilevel import _methods

PyTree = Any
StepSize = float | Callable[[jax.Array], jax.Array]


class Hypergradient(NamedTuple):
  """A hypergradient estimate and the inner iterate it was computed at."""

  grad: PyTree  # like u
  v: PyTree  # v_T


class Inner(NamedTuple):
  """The inner loop's settings, hashable and equal for equal settings (a static argument
  of the compiled functions): ``lr`` for plain descent, or ``given``, an optax optimizer."""

  num_steps: int
  lr: StepSize | None
  given: optax.GradientTransformation | None

  @property
  def optimizer(self) -> optax.GradientTransformation:
    return self.given if self.given is not None else optax.sgd(self.lr)


@functools.lru_cache(maxsize=256)
def _check_schedule(schedule: Callable[[jax.Array], jax.Array], num_steps: int) -> None:
  """Raises unless ``schedule`` is finite and > 0 on steps ``0..num_steps-1`` (checked once
  per schedule and step count; a schedule that needs traced values passes unchecked)."""
  try:
    values = np.asarray(jax.vmap(schedule)(jnp.arange(max(num_steps, 1))))
  except jax.errors.ConcretizationTypeError:
    return
  good = np.isfinite(values) & (values > 0)
  if not np.all(good):
    bad = int(np.argmax(~good))
    raise ValueError(
      f"the inner_lr schedule must give finite values > 0 on the steps 0..{num_steps - 1},"
      f" got {values[bad]} at step {bad}."
    )


def check_inner(
  num_steps: Any, inner_lr: StepSize | None, inner: optax.GradientTransformation | None
) -> Inner:
  """Validates the inner loop's settings: ``num_steps`` and exactly one of ``inner_lr``
  (a number > 0 or a schedule ``t -> ρ_t`` with finite positive values) or ``inner`` (an
  optax optimizer)."""
  num_steps = check_steps("num_steps", num_steps)
  if (inner_lr is None) == (inner is None):
    raise ValueError(
      "pass exactly one of inner_lr= (the inner step size: a number or a schedule) and "
      "inner= (an optax optimizer for v), got " + ("neither." if inner_lr is None else "both.")
    )
  if inner is not None:
    if not isinstance(inner, optax.GradientTransformation):
      raise TypeError(f"inner must be an optax.GradientTransformation, got {inner!r}.")
    return Inner(num_steps, None, inner)
  if callable(inner_lr):
    _check_schedule(inner_lr, num_steps)
  elif not (
    isinstance(inner_lr, int | float | np.floating)
    and not isinstance(inner_lr, bool)
    and math.isfinite(inner_lr)
    and inner_lr > 0
  ):
    raise ValueError(f"inner_lr must be a finite number > 0 or a schedule, got {inner_lr!r}.")
  return Inner(num_steps, inner_lr, None)


def lower_loop(g: Callable[..., jax.Array], inner: Inner, remat: str | None, u, v0, args):
  """``v_T``: ``inner.num_steps`` steps of ``inner.optimizer`` on ``g(u, ·, *args)``.

  ``remat`` (for reverse-mode autodiff through the loop): ``None`` stores what autodiff
  stores, ``"step"`` rematerializes every step (the iterates alone are kept), ``"sqrt"``
  keeps one iterate every ``⌈√T⌉`` steps and recomputes the segments.
  """
  opt, T = inner.optimizer, inner.num_steps
  grad_v = jax.grad(g, argnums=1)

  def step(carry, _):
    v, state = carry
    updates, state = opt.update(grad_v(u, v, *args), state, v)
    return (optax.apply_updates(v, updates), state), None

  if remat is not None:
    step = jax.checkpoint(step)
  carry = (v0, opt.init(v0))
  if remat == "sqrt" and T > 1:
    c = math.isqrt(T - 1) + 1  # ⌈√T⌉
    segment = jax.checkpoint(lambda carry, _: (jax.lax.scan(step, carry, length=c)[0], None))
    carry, _ = jax.lax.scan(segment, carry, length=T // c)
    T = T % c
  carry, _ = jax.lax.scan(step, carry, length=T)
  return carry[0]


def _fmd_loop(g, inner, u, v0, args):
  return lower_loop(g, inner, None, u, v0, args)


def _fmd_fwd(g, inner, u, v0, args):
  primals = jax.tree.map(lambda p: p.value, (u, v0, args))
  flags = jax.tree.map(lambda p: p.perturbed, (u, v0, args))
  leaves, treedef = jax.tree.flatten(primals)
  which = [
    i
    for i, (x, p) in enumerate(zip(leaves, jax.tree.leaves(flags), strict=True))
    if p and jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  if not which:
    return _fmd_loop(g, inner, *primals), jax.tree.unflatten(treedef, [None] * len(leaves))
  x, unravel = ravel_pytree([leaves[i] for i in which])

  def loop(x):
    new = list(leaves)
    for i, leaf in zip(which, unravel(x), strict=True):
      new[i] = leaf
    return _fmd_loop(g, inner, *jax.tree.unflatten(treedef, new))

  # One forward pass, the tangents of every input coordinate vmapped: dv_T/dx, (n, V).
  basis = jnp.eye(x.size, dtype=x.dtype)
  v_T, tangents = jax.vmap(lambda e: jax.jvp(loop, (x,), (e,)), out_axes=(None, 0))(basis)
  jac = jnp.concatenate([t.reshape(x.size, -1) for t in jax.tree.leaves(tangents)], axis=1)
  blocks: list[Any] = [None] * len(leaves)
  offset = 0
  for i in which:
    size = int(np.prod(jnp.shape(leaves[i])))
    block = jac[offset : offset + size].reshape(jnp.shape(leaves[i]) + (jac.shape[1],))
    blocks[i] = block.astype(jnp.result_type(leaves[i]))  # the cotangent's dtype
    offset += size
  return v_T, jax.tree.unflatten(treedef, blocks)


def _fmd_bwd(g, inner, jac, v_bar):
  del g, inner
  zero = jax.custom_derivatives.SymbolicZero
  v_bar = jax.tree.map(
    lambda c: jnp.zeros(c.shape, c.dtype) if isinstance(c, zero) else c,
    v_bar,
    is_leaf=lambda c: isinstance(c, zero),
  )
  v_bar = ravel_pytree(v_bar)[0]
  return jax.tree.map(
    lambda J: None if J is None else (J @ v_bar.astype(J.dtype)),
    jac,
    is_leaf=lambda x: x is None,
  )


_fmd = jax.custom_vjp(_fmd_loop, nondiff_argnums=(0, 1))
_fmd.defvjp(_fmd_fwd, _fmd_bwd, symbolic_zeros=True)


def _implicit_loop(g, inner, method, u, v0, args):
  return lower_loop(g, inner, None, u, v0, args)


def _implicit_fwd(g, inner, method, u, v0, args):
  v_T = lower_loop(g, inner, None, u, v0, args)
  return v_T, (u, v_T, args)


def _implicit_bwd(g, inner, method, res, v_bar):
  del inner
  u, v_T, args = res
  # A fresh forward-over-reverse product per iteration: on the CPU recomputing ∇_v g's
  # forward pass measured as fast as (MLP) or faster than (separable, V = 10^6: 61 vs 68 ms
  # for the whole hypergradient) reading the residuals that jax.linearize stores.
  q = method.solve(lambda x: derivatives.hvp_vv(g, u, v_T, x, *args), v_bar)
  u_bar, args_bar = derivatives.vjp_grad_v(g, u, v_T, q, *args)
  neg = lambda c, x: -c if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else None
  return (
    jax.tree.map(jnp.negative, u_bar),
    None,
    jax.tree.map(neg, args_bar, args),
  )


_implicit = jax.custom_vjp(_implicit_loop, nondiff_argnums=(0, 1, 2))
_implicit.defvjp(_implicit_fwd, _implicit_bwd)


def _argmin(g, method, inner: Inner, u, v0, args):
  """``v_T`` with the derivative rule of ``method`` (traceable, no checks)."""
  g = scalar_output(g, "the lower objective g(u, v)")
  if isinstance(method, _methods.Naive):
    return jax.lax.stop_gradient(lower_loop(g, inner, None, u, v0, args))
  if isinstance(method, _methods.RMD):
    return lower_loop(g, inner, "sqrt" if method.checkpoint else "step", u, v0, args)
  # The custom rules differentiate their explicit inputs only: values g closes over (a
  # hyperparameter under an outer jax.grad, say) become explicit arguments.
  g, consts = jax.closure_convert(g, u, v0, *args)
  args = (*args, *consts)
  if isinstance(method, _methods.FMD):
    return _fmd(g, inner, u, v0, args)
  return _implicit(g, inner, method, u, v0, args)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _argmin_jit(g, method, inner, u, v0, args):
  return _argmin(g, method, inner, u, v0, args)


def _check(u, v0, method):
  check_float_leaves(u, "u")
  check_float_leaves(v0, "v0")
  return _methods.check_method(method, penalty_ok=False)


def argmin(
  g: Callable[..., jax.Array],
  u: PyTree,
  v0: PyTree,
  *args: Any,
  method: _methods.Method,
  num_steps: int,
  inner_lr: StepSize | None = None,
  inner: optax.GradientTransformation | None = None,
) -> PyTree:
  r"""``v_T ≈ argmin_v g(u, v, *args)``, differentiable in ``u`` and ``args`` by ``method``.

  Runs ``num_steps`` steps of gradient descent with step ``inner_lr`` (or of the optax
  optimizer ``inner``) on ``g(u, ·, *args)`` from ``v0``. Under ``jax.grad``, ``jax.vjp``
  (and so inside any loss) the derivative of ``v_T`` is the method's: ``jax.grad`` of
  ``u ↦ f(u, argmin(g, u, v0, ...))`` is the hypergradient (see ``hypergradient``). It
  composes with ``jit``, ``vmap`` and ``jax.checkpoint``.

  ``args``, and any traced value ``g`` closes over, are differentiated too (implicitly,
  like ``u``). ``v0`` is a starting point: only ``RMD`` and ``FMD`` differentiate through
  it (the unrolled loop depends on it); for the implicit methods and ``Naive`` its
  cotangent is zero (a fixed point does not depend on where the search started). Calls
  with the same ``g`` object, method, settings and shapes reuse one compiled program
  (``argmin`` and ``hypergradient`` are jitted with ``g`` static: define ``g`` once, not
  in a loop). Reverse mode only: the implicit methods and ``FMD`` are ``custom_vjp``
  rules, so ``jax.jvp``, ``jax.jacfwd`` and second derivatives through ``argmin`` need
  ``RMD`` or ``Naive``.

  Args:
    g: lower objective ``g(u, v, *args) -> scalar``.
    u: upper variable, a pytree of floats.
    v0: initial inner iterate, a pytree of floats.
    *args: extra arguments of ``g`` (a batch, hyperparameters).
    method: ``Naive()``, ``FMD()``, ``RMD(...)``, ``ApproxGrad(...)``, ``CG(...)`` or
      ``Neumann(...)``.
    num_steps: T >= 0, inner steps.
    inner_lr: ρ > 0, a number or a schedule ``t -> ρ_t``: plain gradient descent.
    inner: instead of ``inner_lr``, any optax optimizer for ``v`` (its state, and the step
      count of a schedule, start fresh from ``v0`` on every call).

  Returns:
    ``v_T``, a pytree like ``v0``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kbeam_jax import bilevel
    >>> g = lambda u, v: jnp.sum((v - u) ** 2) / 2  # v*(u) = u
    >>> f = lambda u, v: jnp.sum((v - 1.0) ** 2)  # so df/du = 2(u - 1)
    >>> F = lambda u: f(u, bilevel.argmin(g, u, jnp.zeros(1), method=bilevel.CG(20),
    ...                                   num_steps=50, inner_lr=0.5))
    >>> jax.grad(F)(jnp.array([3.0]))
    Array([4.], dtype=float32)
  """
  method = _check(u, v0, method)
  return _argmin_jit(g, method, check_inner(num_steps, inner_lr, inner), u, v0, args)


def value_and_hypergradient(f, g, method, inner: Inner, u, v0, args):
  """``(f(u, v_T), Hypergradient(grad, v_T))`` (traceable, no checks)."""
  f = scalar_output(f, "the upper objective f(u, v)")

  def F(u):
    v = _argmin(g, method, inner, u, v0, args)
    return f(u, v, *args), v

  (value, v), grad = jax.value_and_grad(F, has_aux=True)(u)
  return value, Hypergradient(grad, v)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _hypergradient_jit(f, g, method, inner, u, v0, args):
  return value_and_hypergradient(f, g, method, inner, u, v0, args)[1]


def hypergradient(
  f: Callable[..., jax.Array],
  g: Callable[..., jax.Array],
  u: PyTree,
  v0: PyTree,
  *args: Any,
  method: _methods.Method,
  num_steps: int,
  inner_lr: StepSize | None = None,
  inner: optax.GradientTransformation | None = None,
) -> Hypergradient:
  r"""The hypergradient of ``u ↦ f(u, v_T(u), *args)``, ``v_T`` from ``argmin``.

  Exactly ``jax.grad(lambda u: f(u, argmin(g, u, v0, *args, ...), *args))(u)``, with
  ``v_T`` returned beside it (the next warm start). For a converged inner solve and an
  accurate linear solve every method approaches the true hypergradient
  ``∇_u f - ∇²_uv g (∇²_vv g)⁻¹ ∇_v f``; ``FMD`` and ``RMD`` give the exact derivative of
  the unrolled T steps; ``Naive`` gives ``∇_u f`` alone.

  Args:
    f: upper objective ``f(u, v, *args) -> scalar``.
    g: lower objective ``g(u, v, *args) -> scalar``.
    u, v0, *args, method, num_steps, inner_lr, inner: as in ``argmin``.

  Returns:
    ``Hypergradient(grad, v)``: the derivative (like ``u``) and ``v_T``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum((v - 1.0) ** 2)
    >>> g = lambda u, v: jnp.sum((v - u) ** 2) / 2  # v*(u) = u, df/du = 2(u - 1)
    >>> for method in [bilevel.FMD(), bilevel.RMD(), bilevel.CG(5),
    ...                bilevel.ApproxGrad(50, 0.5), bilevel.Neumann(40, 0.5)]:
    ...   out = bilevel.hypergradient(f, g, jnp.array([3.0]), jnp.array([0.0]),
    ...                               method=method, num_steps=50, inner_lr=0.5)
    ...   print(type(method).__name__, out.grad)
    FMD [4.]
    RMD [4.]
    CG [4.]
    ApproxGrad [4.]
    Neumann [4.]
  """
  method = _check(u, v0, method)
  inner_ = check_inner(num_steps, inner_lr, inner)
  return _hypergradient_jit(f, g, method, inner_, u, v0, args)
