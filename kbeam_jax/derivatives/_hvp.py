"""Hessian-vector products of ``g(u, v, *args)`` on pytrees, never forming a Hessian.

The second derivatives the package names once, for its own solvers and for users (the
unrolled methods, FMD included, and the games' solvers differentiate their loops and
losses with ``jax.jvp``/``jax.vjp`` directly):

* ``hvp_vv``   ``∇²_vv g · q``, forward-over-reverse (a ``jvp`` of ``∇_v g``);
* ``hvp_uv``   ``∇²_uv g · q``, a ``vjp`` of ``∇_v g`` with respect to ``u``;
* ``jvp_grad_v`` ``∇²_vu g · du + ∇²_vv g · dv``, the directional derivative of ``∇_v g``;
* ``hvp_joint`` ``(∇²_uv g · q, ∇²_vv g · q)`` in one ``vjp`` (the penalty method's
  gradient of ``½|∇_v g|²`` when ``q = ∇_v g``);
* ``grad_and_hvp_vv`` / ``linearize_hvp_vv`` ``∇_v g`` and ``q ↦ ∇²_vv g · q`` linearized
  once (the matrix of the implicit methods' linear solves);
* ``vjp_grad_v`` ``(∇²_uv g · q, ∂_args(∇_v g)ᵀ q)`` (their mixed term).

FMD and RMD differentiate the unrolled inner loop by ``jax.jvp`` / autodiff of the loop
itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from kbeam_jax._checks import check_same_structure, scalar_output
from kbeam_jax._tree import PyTree


def _grad_v(g: Callable[..., jax.Array]) -> Callable[..., PyTree]:
  return jax.grad(scalar_output(g, "g"), argnums=1)


def hvp(f: Callable[..., jax.Array], x: PyTree, q: PyTree, *args: Any) -> PyTree:
  """Hessian-vector product ``∇²f(x) · q`` of a scalar function of one pytree.

  Args:
    f: scalar function ``f(x, *args)``.
    x: point, a pytree.
    q: direction, a pytree with the structure of ``x``.
    *args: extra arguments passed to ``f``.

  Returns:
    ``∇²f(x) · q``, a pytree like ``x``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.derivatives import hvp
    >>> hvp(lambda x: (x ** 3).sum(), jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
    Array([ 6., 12.], dtype=float32)
  """
  check_same_structure(x, q, "x", "q")
  grad_f = jax.grad(scalar_output(f, "f"))
  return jax.jvp(lambda x_: grad_f(x_, *args), (x,), (q,))[1]


def hvp_vv(g: Callable[..., jax.Array], u: PyTree, v: PyTree, q: PyTree, *args: Any) -> PyTree:
  """``∇²_vv g(u, v) · q`` by forward-over-reverse differentiation.

  Args:
    g: scalar function ``g(u, v, *args)``.
    u, v: the point.
    q: direction, a pytree like ``v``.
    *args: extra arguments passed to ``g``.

  Returns:
    A pytree like ``v``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.derivatives import hvp_vv
    >>> g = lambda u, v: (u * v ** 2).sum()
    >>> hvp_vv(g, jnp.array([3.0]), jnp.array([1.0]), jnp.array([1.0]))
    Array([6.], dtype=float32)
  """
  check_same_structure(v, q, "v", "q")
  grad_v = _grad_v(g)
  return jax.jvp(lambda v_: grad_v(u, v_, *args), (v,), (q,))[1]


def hvp_uv(g: Callable[..., jax.Array], u: PyTree, v: PyTree, q: PyTree, *args: Any) -> PyTree:
  """``∇²_uv g(u, v) · q``: the vjp of ``∇_v g`` with respect to ``u``.

  ``∇²_uv g`` is the ``dim(u) × dim(v)`` block ``∂²g / ∂u ∂v``, so the product maps a
  ``v``-shaped direction to a ``u``-shaped vector.

  Args:
    g: scalar function ``g(u, v, *args)``.
    u, v: the point.
    q: direction, a pytree like ``v``.
    *args: extra arguments passed to ``g``.

  Returns:
    A pytree like ``u``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.derivatives import hvp_uv
    >>> g = lambda u, v: (u * v ** 2).sum()
    >>> hvp_uv(g, jnp.array([3.0]), jnp.array([2.0]), jnp.array([1.0]))
    Array([4.], dtype=float32)
  """
  check_same_structure(v, q, "v", "q")
  grad_v = _grad_v(g)
  _, pullback = jax.vjp(lambda u_: grad_v(u_, v, *args), u)
  return pullback(q)[0]


def jvp_grad_v(
  g: Callable[..., jax.Array], u: PyTree, v: PyTree, du: PyTree, dv: PyTree, *args: Any
) -> tuple[PyTree, PyTree]:
  """``∇_v g`` and its directional derivative ``∇²_vu g · du + ∇²_vv g · dv``.

  Forward mode: one ``jvp`` of ``(u, v) ↦ ∇_v g(u, v)``: the product forward-mode
  differentiation of gradient descent propagates, one column of ``dv/du`` per call
  (``vmap`` it over the columns).

  Args:
    g: scalar function ``g(u, v, *args)``.
    u, v: the point.
    du: tangent of ``u``, a pytree like ``u``.
    dv: tangent of ``v``, a pytree like ``v``.
    *args: extra arguments passed to ``g``.

  Returns:
    ``(∇_v g(u, v), ∇²_vu g · du + ∇²_vv g · dv)``, both pytrees like ``v``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.derivatives import jvp_grad_v
    >>> g = lambda u, v: (u * v ** 2).sum()
    >>> one = jnp.array([1.0])
    >>> jvp_grad_v(g, jnp.array([3.0]), jnp.array([2.0]), one, one)
    (Array([12.], dtype=float32), Array([10.], dtype=float32))
  """
  check_same_structure(u, du, "u", "du")
  check_same_structure(v, dv, "v", "dv")
  grad_v = _grad_v(g)
  return jax.jvp(lambda u_, v_: grad_v(u_, v_, *args), (u, v), (du, dv))


def hvp_joint(
  g: Callable[..., jax.Array], u: PyTree, v: PyTree, q: PyTree, *args: Any
) -> tuple[PyTree, PyTree]:
  """``(∇²_uv g · q, ∇²_vv g · q)`` in a single vjp of ``∇_v g``.

  With ``q = ∇_v g`` this is the gradient of the penalty ``½|∇_v g|²`` in ``(u, v)``.

  Args:
    g: scalar function ``g(u, v, *args)``.
    u, v: the point.
    q: direction, a pytree like ``v``.
    *args: extra arguments passed to ``g``.

  Returns:
    A pair of pytrees, like ``u`` and like ``v``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.derivatives import hvp_joint
    >>> g = lambda u, v: (u * v ** 2).sum()
    >>> hvp_joint(g, jnp.array([3.0]), jnp.array([2.0]), jnp.array([1.0]))
    (Array([4.], dtype=float32), Array([6.], dtype=float32))
  """
  check_same_structure(v, q, "v", "q")
  grad_v = _grad_v(g)
  _, pullback = jax.vjp(lambda u_, v_: grad_v(u_, v_, *args), u, v)
  return pullback(q)


def grad_and_hvp_vv(
  g: Callable[..., jax.Array], u: PyTree, v: PyTree, *args: Any
) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
  """``∇_v g(u, v)`` and the linear map ``q ↦ ∇²_vv g(u, v) · q``, linearized once.

  ``jax.linearize`` of ``∇_v g`` evaluates the gradient once and keeps what its
  derivative needs, so each product afterwards costs one forward-mode pass of the
  linearized gradient and no recomputation of ``g``: the matrix of an iterative solve, or
  a product whose direction depends on the gradient itself (the penalty method's
  ``∇²_vv g (ν + γ∇_v g)``).

  Args:
    g: scalar function ``g(u, v, *args)``.
    u, v: the point.
    *args: extra arguments passed to ``g``.

  Returns:
    ``(∇_v g, hvp)``, ``hvp`` a function of a pytree like ``v`` returning one like ``v``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.derivatives import grad_and_hvp_vv
    >>> g = lambda u, v: (u * v ** 2).sum()
    >>> grad, H = grad_and_hvp_vv(g, jnp.array([3.0]), jnp.array([1.0]))
    >>> grad, H(jnp.array([2.0]))
    (Array([6.], dtype=float32), Array([12.], dtype=float32))
  """
  grad_v = _grad_v(g)
  grad, linear = jax.linearize(lambda v_: grad_v(u, v_, *args), v)
  return grad, lambda q: linear(q)


def linearize_hvp_vv(
  g: Callable[..., jax.Array], u: PyTree, v: PyTree, *args: Any
) -> Callable[[PyTree], PyTree]:
  """The linear map ``q ↦ ∇²_vv g(u, v) · q``, linearized once (see ``grad_and_hvp_vv``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.derivatives import linearize_hvp_vv
    >>> g = lambda u, v: (u * v ** 2).sum()
    >>> H = linearize_hvp_vv(g, jnp.array([3.0]), jnp.array([1.0]))
    >>> H(jnp.array([1.0])), H(jnp.array([2.0]))
    (Array([6.], dtype=float32), Array([12.], dtype=float32))
  """
  return grad_and_hvp_vv(g, u, v, *args)[1]


def vjp_grad_v(
  g: Callable[..., jax.Array], u: PyTree, v: PyTree, q: PyTree, *args: Any
) -> tuple[PyTree, tuple[Any, ...]]:
  """``(∇²_uv g · q, ∂_args(∇_v g)ᵀ q)``: the vjp of ``∇_v g`` in ``u`` and in ``args``.

  The mixed term of an implicit hypergradient, for ``u`` and for every argument of
  ``g`` at once (integer arguments get zero cotangents of dtype ``float0``).

  Args:
    g: scalar function ``g(u, v, *args)``.
    u, v: the point.
    q: direction, a pytree like ``v``.
    *args: extra arguments passed to ``g``.

  Returns:
    ``(like u, tuple like args)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.derivatives import vjp_grad_v
    >>> g = lambda u, v, c: (u * c * v ** 2).sum()
    >>> vjp_grad_v(g, jnp.array([3.0]), jnp.array([2.0]), jnp.array([1.0]), jnp.array([1.0]))
    (Array([4.], dtype=float32), (Array([12.], dtype=float32),))
  """
  check_same_structure(v, q, "v", "q")
  grad_v = _grad_v(g)
  _, pullback = jax.vjp(lambda u_, args_: grad_v(u_, v, *args_), u, args)
  return pullback(q)
