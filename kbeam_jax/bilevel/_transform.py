"""Bilevel methods as optax ``GradientTransformationExtraArgs`` for the upper variable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kbeam_jax._checks import check_float_leaves, check_same_structure, check_steps, scalar_output
from kbeam_jax._tree import tree_norm
from kbeam_jax.bilevel import _hypergrad, _penalty

PyTree = Any

METHODS: dict[str, Callable[..., _hypergrad.Hypergradient]] = {
  "fmd": _hypergrad.fmd,
  "rmd": _hypergrad.rmd,
  "approxgrad": _hypergrad.approxgrad,
  "cg": _hypergrad.cg,
  "neumann": _hypergrad.neumann,
}


class ScaleByHypergradientState(NamedTuple):
  """The lower variable ``v`` (warm-started between updates) and the update count."""

  v: PyTree
  count: jax.Array


def _check_update(updates, params):
  if params is None:
    raise ValueError("bilevel transforms need params: call tx.update(grads, state, params, ...).")
  if updates is not None:
    check_same_structure(updates, params, "grads", "params")


def scale_by_hypergradient(
  method: str, v: PyTree, *, num_steps: int, inner_lr: float, **method_kwargs: Any
) -> optax.GradientTransformationExtraArgs:
  r"""Replaces the incoming gradient by a hypergradient of ``u ↦ f(u, v_T(u))``.

  ``update(grads, state, params, *, upper_fn, lower_fn, **extra_args)``: from the ``v``
  in the state, run ``num_steps`` descent steps on ``lower_fn(params, ·)`` and
  differentiate through them with ``method``; the state keeps ``v_T`` as the next
  warm start. The incoming ``grads`` are ignored (a plain gradient of ``upper_fn`` misses
  the ``dv/du`` term); only their structure is checked. Chain an optimizer after it.

  Args:
    method: ``"fmd"``, ``"rmd"``, ``"approxgrad"``, ``"cg"`` or ``"neumann"``.
    v: the initial lower variable.
    num_steps: T, inner steps per update.
    inner_lr: ρ, the inner step size.
    **method_kwargs: the method's own options (``solve_steps``, ``solve_lr``,
      ``damping``, ``checkpoint``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum((v - 1.0) ** 2) + 0.1 * jnp.sum(u ** 2)
    >>> g = lambda u, v: jnp.sum((v - u) ** 2) / 2
    >>> tx = optax.chain(bilevel.scale_by_hypergradient("rmd", jnp.zeros(2), num_steps=10,
    ...                                                 inner_lr=0.5), optax.sgd(0.1))
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
  if method not in METHODS:
    raise ValueError(f"method must be one of {sorted(METHODS)}, got method={method!r}.")
  check_float_leaves(v, "v")
  hypergradient = METHODS[method]

  def init_fn(params):
    del params
    return ScaleByHypergradientState(v=v, count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, upper_fn, lower_fn, **extra_args):
    del extra_args
    _check_update(updates, params)
    out = hypergradient(
      upper_fn, lower_fn, params, state.v, num_steps=num_steps, inner_lr=inner_lr, **method_kwargs
    )
    grad = jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), out.grad, params)
    return grad, ScaleByHypergradientState(v=out.v, count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScaleByPenaltyState(NamedTuple):
  """Lower variable, its optimizer state, and the penalty schedule."""

  v: PyTree
  lower_state: Any
  gamma: jax.Array
  epsilon: jax.Array
  nu: PyTree
  count: jax.Array
  grad_v_g_norm: jax.Array


def scale_by_penalty(
  v: PyTree,
  lower: optax.GradientTransformation,
  *,
  num_inner: int = 1,
  gamma: float = 1.0,
  epsilon: float = 1.0,
  gamma_factor: float = 1.1,
  epsilon_factor: float = 0.9,
  lower_weight: float = 0.0,
  augmented: bool = False,
  max_gamma: float = float("inf"),
  warmup_steps: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""The penalty method's upper step as an optax transform; ``v`` lives in the state.

  ``update(grads, state, params, *, upper_fn, lower_fn, **extra_args)``: ``num_inner``
  steps of ``lower`` on ``v`` for ``L + λg``, then returns ``∇_u L`` at the new ``v``
  (chain the upper optimizer after it), with ``L = f + νᵀ∇_v g + (γ/2)|∇_v g|²``. When
  ``|∇L|² < ε²`` at that point the schedule tightens for the next update. The incoming
  ``grads`` are ignored. The first update takes ``warmup_steps`` more steps on ``v``.
  See ``penalty`` for the arguments.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from kbeam_jax import bilevel
    >>> f = lambda u, v: jnp.sum(u ** 2) + jnp.sum(v ** 2)
    >>> g = lambda u, v: jnp.sum((1.0 - u - v) ** 2)
    >>> tx = optax.chain(bilevel.scale_by_penalty(jnp.zeros(2), optax.sgd(0.01), num_inner=5,
    ...                                            augmented=True, max_gamma=20.0),
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
  check_float_leaves(v, "v")
  warmup_steps = check_steps("warmup_steps", warmup_steps)
  _penalty.check_schedule(gamma, epsilon, gamma_factor, epsilon_factor, lower_weight)

  def init_fn(params):
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return ScaleByPenaltyState(
      v=v,
      lower_state=lower.init(v),
      gamma=jnp.asarray(gamma, dtype),
      epsilon=jnp.asarray(epsilon, dtype),
      nu=jax.tree.map(jnp.zeros_like, v),
      count=jnp.zeros([], jnp.int32),
      grad_v_g_norm=jnp.zeros([], dtype),
    )

  def update_fn(updates, state, params=None, *, upper_fn, lower_fn, **extra_args):
    del extra_args
    _check_update(updates, params)
    f = scalar_output(upper_fn, "upper_fn(u, v)")
    g = scalar_output(lower_fn, "lower_fn(u, v)")
    gam, nu = state.gamma, state.nu
    num = _penalty.steps_now(num_inner, warmup_steps, state.count)
    v, lower_state = _penalty.lower_steps(
      f, g, lower, num, lower_weight, params, state.v, state.lower_state, gam, nu, ()
    )
    grad_u, grad_v, g_v = _penalty.penalized_grads(f, g, params, v, gam, nu, ())
    new_gamma, new_eps, nu, _, _ = _penalty.tighten(
      grad_u,
      grad_v,
      g_v,
      gam,
      state.epsilon,
      nu,
      gamma_factor,
      epsilon_factor,
      augmented,
      max_gamma,
    )
    new_state = ScaleByPenaltyState(
      v=v,
      lower_state=lower_state,
      gamma=new_gamma,
      epsilon=new_eps,
      nu=nu,
      count=optax.safe_increment(state.count),
      grad_v_g_norm=tree_norm(g_v).astype(gam.dtype),
    )
    grad_u = jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), grad_u, params)
    return grad_u, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
