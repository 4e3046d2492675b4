"""Bilevel methods as optax ``GradientTransformationExtraArgs`` for the upper variable.

The same cores as ``bilevel.solver`` and ``bilevel.penalty``: ``update`` computes the
direction for the parameters ``u`` (the incoming gradients are ignored) and keeps ``v``
(and the linear solve's warm start, or the penalty method's schedule) in the state. The
objectives arrive as the keyword extra arguments ``upper_fn=f`` and ``lower_fn=g``, names
that no optax transform uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kbeam_jax._checks import check_float_leaves, check_same_structure
from kbeam_jax._tree import PyTree
from kbeam_jax.bilevel import _methods, _outer, _penalty
from kbeam_jax.bilevel._argmin import InnerSettings
from kbeam_jax.bilevel._hypergradient import HypergradientInfo


class ScaleByHypergradientState(NamedTuple):
  """The lower variable ``v`` (warm-started between updates), the linear solve's last
  answer ``adjoint`` (``None`` for the methods without one), the update count and the
  last update's ``info`` (a ``HypergradientInfo``: read a field with
  ``optax.tree.get(opt_state, "diverging")``)."""

  v: PyTree
  adjoint: Any
  count: jax.Array
  info: Any


class ScaleByPenaltyState(NamedTuple):
  """The lower variable ``v``, the penalty method's state, the update count and the last
  update's ``info`` (a ``PenaltyInfo``)."""

  v: PyTree
  lower: Any
  count: jax.Array
  info: Any


def _check_update(updates, params):
  if params is None:
    raise ValueError(
      "bilevel transforms need params: call tx.update(grads, state, params, upper_fn=f, "
      "lower_fn=g)."
    )
  if updates is not None:
    check_same_structure(updates, params, "grads", "params")


_FLAGS = {
  "converged": False,
  "diverging": False,
  "increased": False,
  "finite": True,
  "negative_curvature": False,
}


def _zero_info(info_type, params):
  """The ``info`` before the first update: flags clear, ``finite``, numbers NaN."""
  dtype = jnp.promote_types(jnp.result_type(*jax.tree.leaves(params)), jnp.float32)

  def start(name):
    if name in _FLAGS:
      return jnp.asarray(_FLAGS[name])
    if name == "inner_steps":
      return jnp.zeros([], jnp.int32)
    return jnp.full([], jnp.nan, dtype)

  return info_type(**{name: start(name) for name in info_type._fields})


def _core_transform(
  core: _outer.Core, v, state_type, info_type
) -> optax.GradientTransformationExtraArgs:
  """``core`` (``_outer.Core``) as a transform with the states ``state_type(v, aux, count,
  info)``, ``info`` an ``info_type``."""
  check_float_leaves(v, "v")

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    return state_type(v, core.init(params, v), count, _zero_info(info_type, params))

  def update_fn(updates, state, params=None, *, upper_fn, lower_fn, **extra_args):
    del extra_args
    _check_update(updates, params)
    v, aux, count, last_info = state
    grad, v, aux, info = core.direction(upper_fn, lower_fn, params, v, aux, ())
    info = jax.tree.map(lambda new, old: new.astype(old.dtype), info, last_info)
    return grad, state_type(v, aux, optax.safe_increment(count), info)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_hypergradient(
  method: _methods.Method,
  v: PyTree,
  *,
  inner_steps: int | None = None,
  inner_lr: Any = None,
  inner: optax.GradientTransformation | None = None,
  tol: float | None = None,
  solve: Callable[..., PyTree] | None = None,
  project_v: Callable[[PyTree], PyTree] | None = None,
  prox: Callable[..., PyTree] | None = None,
  throw: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Replaces the incoming gradient by the hypergradient of ``method`` for ``u``.

  ``update(grads, state, params, *, upper_fn, lower_fn, **extra_args)``: from the ``v`` in
  the state, the inner solve on ``lower_fn(params, ·)`` and the method's hypergradient of
  ``upper_fn``; the state keeps the new ``v`` (and the linear solve's answer) as the next
  warm start. The incoming ``grads`` are ignored (a plain gradient of ``upper_fn`` misses
  the ``dv/du`` term; pass ``None``), only their structure is checked. Chain an optimizer
  after it; a sequence of updates then equals ``bilevel.solver``'s steps.

  Args:
    method: a hypergradient method value (``bilevel.CG(10)``, ...).
    v: the initial lower variable.
    inner_steps, inner_lr, inner, tol, solve, project_v, prox, throw: the inner solve, as
      in ``bilevel.argmin``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum((v - 1.0) ** 2) + 0.1 * jnp.sum(u ** 2)
    >>> g = lambda u, v: jnp.sum((v - u) ** 2) / 2
    >>> tx = optax.chain(bilevel.scale_by_hypergradient(bilevel.RMD(), jnp.zeros(2),
    ...                                                 inner_steps=10, inner_lr=0.5),
    ...                  optax.sgd(0.1))
    >>> @jax.jit
    ... def step(u, state):
    ...   updates, state = tx.update(None, state, u, upper_fn=f, lower_fn=g)
    ...   return optax.apply_updates(u, updates), state
    >>> u = jnp.zeros(2); state = tx.init(u)
    >>> for _ in range(200):
    ...   u, state = step(u, state)
    >>> jnp.round(u, 2)  # min (u - 1)² + 0.1 u²  at  u = 1 / 1.1
    Array([0.91, 0.91], dtype=float32)
  """
  settings = InnerSettings(solve, inner_steps, inner_lr, inner, tol, project_v, prox)
  core = _outer.hypergradient_core(method, settings, throw)
  return _core_transform(core, v, ScaleByHypergradientState, HypergradientInfo)


def scale_by_penalty(
  v: PyTree,
  *,
  inner_steps: int = 1,
  inner_lr: Any = None,
  inner: optax.GradientTransformation | None = None,
  project_v: Callable[[PyTree], PyTree] | None = None,
  **options: Any,
) -> optax.GradientTransformationExtraArgs:
  """The penalty method's direction for ``u`` as an optax transform (``bilevel.penalty``'s
  core; ``options`` as there).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum(u ** 2) + jnp.sum(v ** 2)
    >>> g = lambda u, v: jnp.sum((1.0 - u - v) ** 2)
    >>> tx = optax.chain(bilevel.scale_by_penalty(jnp.zeros(2), inner_steps=5, inner_lr=0.01,
    ...                                           augmented=True, max_gamma=20.0),
    ...                  optax.sgd(0.01))
    >>> @jax.jit
    ... def step(u, state):
    ...   updates, state = tx.update(None, state, u, upper_fn=f, lower_fn=g)
    ...   return optax.apply_updates(u, updates), state
    >>> u = jnp.zeros(2); state = tx.init(u)
    >>> for _ in range(3000):
    ...   u, state = step(u, state)
    >>> jnp.round(u, 2)
    Array([0.5, 0.5], dtype=float32)
  """
  schedule = _penalty.PenaltySchedule(**options)
  core = _penalty.penalty_core(schedule, inner_steps, inner_lr, inner, project_v)
  return _core_transform(core, v, ScaleByPenaltyState, _penalty.PenaltyInfo)
