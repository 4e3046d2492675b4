"""Bilevel methods as optax ``GradientTransformationExtraArgs`` for the upper variable.

The same core as ``bilevel.solver``: ``update`` computes the method's direction for the
parameters ``u`` (the incoming gradients are ignored) and keeps ``v`` (and the penalty
method's schedule) in the state. The objectives arrive as the keyword extra arguments
``upper_fn=f`` and ``lower_fn=g``, names that no optax transform uses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kbeam_jax._checks import check_float_leaves, check_same_structure
from kbeam_jax.bilevel import _argmin, _methods, _outer

PyTree = Any


class ScaleByHypergradientState(NamedTuple):
  """The lower variable ``v`` (warm-started between updates), the penalty method's state
  (``()`` for the hypergradient methods), the update count, and what the last update
  saw: ``finite`` (its direction was finite) and ``lower_grad_norm`` (``|∇_v g|``).
  Read them with ``optax.tree.get(opt_state, "finite")``."""

  v: PyTree
  lower: Any
  count: jax.Array
  finite: jax.Array
  lower_grad_norm: jax.Array


def scale_by_hypergradient(
  method: _methods.Method,
  v: PyTree,
  *,
  num_steps: int,
  inner_lr: _argmin.StepSize | None = None,
  inner: optax.GradientTransformation | None = None,
  project_v: _outer.Projection | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Replaces the incoming gradient by the bilevel direction of ``method`` for ``u``.

  ``update(grads, state, params, *, upper_fn, lower_fn, **extra_args)``: from the ``v`` in
  the state, ``num_steps`` inner steps on ``lower_fn(params, ·)`` and the method's
  hypergradient of ``upper_fn`` (for ``Penalty``: steps on the penalized objective and
  its gradient in ``u``); the state keeps the new ``v`` as the next warm start. The
  incoming ``grads`` are ignored (a plain gradient of ``upper_fn`` misses the ``dv/du``
  term; pass ``None``), only their structure is checked. Chain an optimizer after it;
  a sequence of updates then equals ``bilevel.solver``'s steps with that optimizer.

  Args:
    method: ``Naive()``, ``FMD()``, ``RMD(...)``, ``ApproxGrad(...)``, ``CG(...)``,
      ``Neumann(...)`` or ``Penalty(...)``.
    v: the initial lower variable.
    num_steps: T, inner steps per update.
    inner_lr: the inner step size (a number or a schedule), or
    inner: any optax optimizer for ``v``.
    project_v: optional projection of ``v``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum((v - 1.0) ** 2) + 0.1 * jnp.sum(u ** 2)
    >>> g = lambda u, v: jnp.sum((v - u) ** 2) / 2
    >>> tx = optax.chain(bilevel.scale_by_hypergradient(bilevel.RMD(), jnp.zeros(2),
    ...                                                 num_steps=10, inner_lr=0.5),
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
  inner_ = _argmin.check_inner(num_steps, inner_lr, inner)
  core = _outer.make_core(method, inner_, project_v)
  check_float_leaves(v, "v")

  def init_fn(params):
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return ScaleByHypergradientState(
      v=v,
      lower=core.init(params, v),
      count=jnp.zeros([], jnp.int32),
      finite=jnp.ones([], bool),
      lower_grad_norm=jnp.full([], jnp.nan, dtype),
    )

  def update_fn(updates, state, params=None, *, upper_fn, lower_fn, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
        "bilevel transforms need params: call tx.update(grads, state, params, upper_fn=f, "
        "lower_fn=g)."
      )
    if updates is not None:
      check_same_structure(updates, params, "grads", "params")
    grad, v, lower, info = core.direction(upper_fn, lower_fn, params, state.v, state.lower, ())
    new_state = ScaleByHypergradientState(
      v=v,
      lower=lower,
      count=optax.safe_increment(state.count),
      finite=info.finite,
      lower_grad_norm=info.lower_grad_norm.astype(state.lower_grad_norm.dtype),
    )
    return grad, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_penalty(
  v: PyTree,
  *,
  num_steps: int = 1,
  inner_lr: _argmin.StepSize | None = None,
  inner: optax.GradientTransformation | None = None,
  project_v: _outer.Projection | None = None,
  **options: Any,
) -> optax.GradientTransformationExtraArgs:
  """``scale_by_hypergradient(Penalty(**options), v, ...)``: the penalty method's upper step.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum(u ** 2) + jnp.sum(v ** 2)
    >>> g = lambda u, v: jnp.sum((1.0 - u - v) ** 2)
    >>> tx = optax.chain(bilevel.scale_by_penalty(jnp.zeros(2), num_steps=5, inner_lr=0.01,
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
  return scale_by_hypergradient(
    _methods.Penalty(**options),
    v,
    num_steps=num_steps,
    inner_lr=inner_lr,
    inner=inner,
    project_v=project_v,
  )
