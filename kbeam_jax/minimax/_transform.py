"""K-beam minimax as an optax ``GradientTransformationExtraArgs`` for the leader."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kbeam_jax._checks import (
  check_nonnegative,
  check_num_beams,
  check_optimizer,
  check_same_structure,
  check_steps,
  checked_projection,
  scalar_output,
)
from kbeam_jax._tree import PyTree, tree_all_finite
from kbeam_jax.minimax import _common, _rules
from kbeam_jax.minimax._direction import direction
from kbeam_jax.minimax._kbeam import init_beams


class ScaleByKBeamState(NamedTuple):
  """State of ``scale_by_kbeam``: the beams and what the last update saw.

  ``values``, ``best``, ``eps_set_size``, ``certificate`` and ``num_nonfinite`` are those
  of the last ``update`` (see ``KBeamInfo``: under rule ``Best()`` the certificate is
  ``|∇_u f(u, v_best)|``, not a stationarity measure, unless ``certificate_epsilon`` is
  set; NaN when no beam was valid); read them with
  ``optax.tree.get(opt_state, "certificate")``. ``last_finite`` says whether the last
  update was finite and ``total_notfinite`` counts the updates that were not (they were
  returned as zeros), as in ``optax.apply_if_finite``. ``active`` marks the beams in use.
  """

  beams: PyTree
  follower_state: Any
  key: jax.Array
  count: jax.Array
  values: jax.Array
  best: jax.Array
  eps_set_size: jax.Array
  certificate: jax.Array
  active: jax.Array
  num_nonfinite: jax.Array
  last_finite: jax.Array
  total_notfinite: jax.Array


def scale_by_kbeam(
  follower: optax.GradientTransformation,
  beams: PyTree | Callable[[jax.Array], PyTree],
  *,
  num_beams: int | None = None,
  key: jax.Array | None = None,
  rule: _rules.Rule = _rules.BEST,
  ascent_steps: int = 1,
  project_v: Callable[[PyTree], PyTree] | None = None,
  qp_steps: int | None = None,
  num_active: Any = None,
  certificate_epsilon: float | None = None,
  sharded_beams: bool = False,
  **old_keywords: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Replaces the leader's gradient by the K-beam direction ``z``; the beams live in the state.

  ``update(grads, state, params, *, minimax_fn, **extra_args)`` with
  ``minimax_fn(u, v) -> scalar`` the minimax objective (close over the batch):

  1. from the second call on, every beam takes ``ascent_steps`` ascent steps of
     ``follower`` on ``minimax_fn(params, ·)`` (one vmap; these are the max steps at the
     leader's new point);
  2. returns ``z = Σ_k λ_k ∇_u minimax_fn(params, v_k)`` with the weights of ``rule``
     over the ε-set, exactly as the ``kbeam`` solver's min step.

  The incoming ``grads`` are ignored (only their structure is checked against
  ``params``): they are a gradient at some follower the caller chose, while K-beam
  needs the gradient at the best beams, which only the transform knows. Pass ``None``
  (or zeros): incoming updates that are not zero draw a ``UserWarning`` (once), since
  whatever a transform chained *before* this one added is dropped with them (weight
  decay: chain ``optax.add_decayed_weights`` or ``optax.adamw`` *after* it). Chain a
  learning rate or any optimizer after it: ``optax.chain(scale_by_kbeam(...),
  optax.adam(1e-3))`` runs the K-beam step with Adam on ``z``; a sequence of updates is
  then the same as the ``kbeam`` solver's steps with that leader and the same ``key``
  (the solver's ``project_u`` has no counterpart here: project the parameters yourself
  after ``apply_updates``). ``Kiwiel`` gives
  Kiwiel's weights but no line search (a transform cannot evaluate the objective
  at trial points of the leader; use the solver for the line search).

  Non-finite values are never silent: a beam whose value is NaN or ±inf is left out of
  the best beam, the ε-set and the certificate (counted in ``num_nonfinite``), and an
  update ``z`` that is not finite is returned as zeros (the leader does not move;
  ``last_finite`` and ``total_notfinite`` in the state record it). This is the
  transform's own guard: ``optax.apply_if_finite`` cannot serve here, since it checks
  the incoming gradients, which K-beam ignores.

  Args:
    follower: optax optimizer for one beam (it receives ``-∇_v``, so it ascends).
    beams: the K beams stacked on a leading axis, or an initializer ``key -> v``
      (then ``num_beams`` and ``key`` are required).
    num_beams: K, when ``beams`` is an initializer.
    key: random key for the initializer and the ``Random`` rule.
    rule: ``minimax.Best()`` (default), ``Random(ε)``, ``MinNorm(ε)`` or ``Kiwiel(ε)``.
    ascent_steps: J, ascent steps per beam per update.
    project_v: optional projection of each beam after every ascent step.
    qp_steps: cap on the iterations of the exact simplex QP solver (default ``4K + 10``).
    num_active: use only the first ``num_active`` beams (default all K); the others
      never enter the best beam, the ε-set or the certificate, and do not move.
    certificate_epsilon: ``Best`` only: report the ε-certificate over the beams
      within this ε of the best instead of ``|∇_u f(u, v_best)|`` (see ``kbeam``).
    sharded_beams: the beams are sharded across devices (see ``kbeam`` and
      ``kbeam_jax.parallel``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from kbeam_jax import minimax
    >>> f = lambda u, v: jnp.sum(-u ** 2 + v ** 2 + 2 * u * v)  # anti-saddle, u* = 0
    >>> box = lambda x: jnp.clip(x, -0.5, 0.5)
    >>> tx = optax.chain(
    ...     minimax.scale_by_kbeam(optax.sgd(0.05), jnp.array([[-0.4], [0.4]]),
    ...                            project_v=box),
    ...     optax.sgd(0.05))
    >>> @jax.jit
    ... def step(u, opt_state):
    ...   updates, opt_state = tx.update(jnp.zeros_like(u), opt_state, u, minimax_fn=f)
    ...   return optax.apply_updates(u, updates), opt_state
    >>> u = jnp.array([0.3])
    >>> opt_state = tx.init(u)
    >>> for _ in range(300):
    ...   u, opt_state = step(u, opt_state)
    >>> bool(abs(u[0]) < 0.02)
    True

  References:
    Hamm & Noh, K-Beam Minimax: Efficient Optimization for Deep Adversarial Learning,
    ICML 2018.
  """
  _common.reject_old_keywords("minimax.scale_by_kbeam", old_keywords)
  check_optimizer("follower", follower)
  rule = _rules.check_rule(rule)
  if certificate_epsilon is not None:
    check_nonnegative("certificate_epsilon", certificate_epsilon)
  ascent_steps = _common.check_ascent_steps(ascent_steps)
  qp_steps = None if qp_steps is None else check_steps("qp_steps", qp_steps)
  project_v = checked_projection(project_v, "v")
  if callable(beams):
    if num_beams is None or key is None:
      raise ValueError("beams is an initializer key -> v: pass num_beams=K and key=... too.")
    key, beam_key = jax.random.split(key)
    K = num_beams
  else:
    leaves = jax.tree.leaves(beams)
    if not leaves or not jnp.ndim(leaves[0]):
      raise ValueError(
        "beams must be the K beams stacked on a leading axis (a pytree of arrays of shape "
        f"(K, ...)), or an initializer key -> v with num_beams=K and key; got {beams!r}."
      )
    K = jnp.shape(leaves[0])[0] if num_beams is None else num_beams
    key, beam_key = jax.random.split(jax.random.key(0) if key is None else key)
  active = _common.active_mask(check_num_beams(K), num_active)

  def init_fn(params: PyTree) -> ScaleByKBeamState:
    del params
    stacked = init_beams(beam_key, beams, K)
    dtype = jnp.result_type(*jax.tree.leaves(stacked))
    return ScaleByKBeamState(
      beams=stacked,
      follower_state=jax.vmap(follower.init)(stacked),
      key=key,
      count=jnp.zeros([], jnp.int32),
      values=jnp.zeros((K,), dtype),
      best=jnp.zeros([], jnp.int32),
      eps_set_size=jnp.zeros([], jnp.int32),
      certificate=jnp.full([], jnp.nan, dtype),  # nothing measured yet
      active=active,
      num_nonfinite=jnp.zeros([], jnp.int32),
      last_finite=jnp.ones([], bool),
      total_notfinite=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, *, minimax_fn=None, **extra_args):
    del extra_args
    if minimax_fn is None:
      raise TypeError(
        "scale_by_kbeam's update needs the objective: tx.update(grads, state, params, "
        "minimax_fn=f). Flax's own train_state.TrainState.apply_gradients does not pass it "
        "on: use kbeam_jax.nn.TrainState (linen), or nn.update_without_grads(optimizer, "
        "model, minimax_fn=f) with an nnx.Optimizer."
      )
    if not callable(minimax_fn):
      raise TypeError(
        f"minimax_fn must be the objective, a function (u, v) -> scalar; got "
        f"{type(minimax_fn).__name__}. Close over the batch: minimax_fn=lambda u, v: f(u, v, x)."
      )
    if params is None:
      raise ValueError("scale_by_kbeam needs params: call tx.update(grads, state, params, ...).")
    if updates is not None:
      check_same_structure(updates, params, "grads", "params")
      _warn_if_dropped(updates)
    f = scalar_output(minimax_fn, "minimax_fn(u, v)")

    def max_step(carry):
      return _common.ascend_beams(f, follower, project_v, ascent_steps, params, *carry, ())

    beams, follower_state = jax.lax.cond(
      state.count > 0, max_step, lambda carry: carry, (state.beams, state.follower_state)
    )
    beams = _common.keep_inactive(state.active, beams, state.beams)
    follower_state = _common.keep_inactive(state.active, follower_state, state.follower_state)
    key, rule_key = jax.random.split(state.key)
    eps = rule.epsilon_at(state.count)
    d = direction(
      f,
      rule,
      params,
      beams,
      state.active,
      eps,
      rule_key,
      (),
      qp_steps,
      certificate_epsilon=certificate_epsilon,
      sharded_beams=sharded_beams,
    )
    finite = d.any_valid & tree_all_finite(d.z) & (eps >= 0)
    z = jax.tree.map(
      lambda g, p: jnp.where(finite, g, jnp.zeros_like(g)).astype(jnp.result_type(p)), d.z, params
    )
    new_state = ScaleByKBeamState(
      beams=beams,
      follower_state=follower_state,
      key=key,
      count=optax.safe_increment(state.count),
      values=d.values.astype(state.values.dtype),
      best=d.best.astype(jnp.int32),
      eps_set_size=d.eps_set_size,
      certificate=d.certificate.astype(state.certificate.dtype),
      active=state.active,
      num_nonfinite=d.num_nonfinite,
      last_finite=finite,
      total_notfinite=state.total_notfinite + (~finite).astype(jnp.int32),
    )
    return z, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_DROPPED = (
  "scale_by_kbeam ignores its incoming updates, and they were not zero, so whatever a "
  "transform chained before it added was dropped (weight decay: put optax.add_decayed_weights "
  "or optax.adamw after scale_by_kbeam in the chain). Pass grads=None, or zeros, to the "
  "update if nothing comes before it."
)


def _warn_if_dropped(updates: PyTree) -> None:
  """A ``UserWarning`` from the host when the ignored incoming updates are not all zero.

  The host call happens only when some update is non-zero, so a correct chain pays one
  reduction per update and no host round trip (under ``vmap``, where ``cond`` runs both
  branches, the host is called every update and checks the batched flag itself).
  """
  nonzero = jnp.any(jnp.stack([jnp.any(x != 0) for x in jax.tree.leaves(updates)] or [False]))

  def warn(flag: Any) -> None:
    if np.any(flag):
      warnings.warn(_DROPPED, UserWarning, stacklevel=2)

  jax.lax.cond(nonzero, lambda: jax.debug.callback(warn, nonzero), lambda: None)


def kbeam_sgd(
  learning_rate: optax.ScalarOrSchedule,
  follower: optax.GradientTransformation,
  beams: PyTree | Callable[[jax.Array], PyTree],
  **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """K-beam leader with plain gradient steps: ``chain(scale_by_kbeam, scale_by_learning_rate)``.

  Args:
    learning_rate: the leader's step size ρ, a float or an optax schedule.
    follower: optax optimizer for one beam.
    beams: stacked beams or an initializer (see ``scale_by_kbeam``).
    **kwargs: the keyword arguments of ``scale_by_kbeam``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``minimax_fn=``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from kbeam_jax import minimax
    >>> tx = minimax.kbeam_sgd(0.1, optax.sgd(0.1), jnp.zeros((3, 2)))
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(None, state, jnp.ones(2),
    ...                            minimax_fn=lambda u, v: jnp.sum(u * v + u ** 2))
    >>> updates
    Array([-0.2, -0.2], dtype=float32)
  """
  return optax.chain(
    scale_by_kbeam(follower, beams, **kwargs), optax.scale_by_learning_rate(learning_rate)
  )
