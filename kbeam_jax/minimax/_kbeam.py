"""K-beam minimax (Hamm & Noh, ICML 2018) as a pure ``init`` / ``step`` solver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kbeam_jax._checks import (
  check_float_leaves,
  check_leading_axis,
  check_nonnegative,
  check_num_beams,
  check_optimizer,
  check_steps,
  checked_projection,
  scalar_output,
)
from kbeam_jax._solver import Solver
from kbeam_jax._tree import PyTree, tree_all_finite
from kbeam_jax.minimax import _common, _rules
from kbeam_jax.minimax._direction import direction


class KBeamState(NamedTuple):
  """State of the K-beam solver; ``beams``, ``follower_state`` and ``active`` have a
  leading axis K. Only the ``active`` beams take part; the others stay as they are."""

  u: PyTree
  beams: PyTree
  leader_state: Any
  follower_state: Any
  key: jax.Array
  count: jax.Array
  active: jax.Array


class KBeamInfo(NamedTuple):
  """What one K-beam step saw, all measured at the ``u`` the step started from.

  Attributes:
    values: ``(K,)`` the objective at every beam, ``f(u, v_k)``.
    best: index of the best (largest-value) beam.
    eps_set_size: number of beams within ε of the best (rule ``Best()``: tied with it).
    certificate: the ε-certificate, the norm of the minimum-norm element of the convex
      hull of the ε-set's gradients ``∇_u f(u, v_k)``; 0 means ``u`` is stationary for
      ``max_k f(u, v_k)`` up to ε. Under rule ``Best()`` it is ``|∇_u f(u, v_best)|``,
      which does not go to 0 at a nonsmooth minimax point (two beams tied at the max
      with opposite gradients), unless ``certificate_epsilon`` asks for the
      ε-certificate. NaN when no beam was valid (nothing was measured), never 0.
    step_scale: the line-search scale accepted by rule ``Kiwiel`` (0 = null step);
      1 for the other rules; 0 when the step was skipped.
    num_nonfinite: active beams left out of the best beam, the ε-set and the
      certificate because their value (for the ε-rules: or gradient) was not finite.
    update_finite: False when the leader's step was skipped: its direction or new
      ``u`` was not finite, or no beam was valid; ``u`` and the leader's optimizer
      state then keep their values.
  """

  values: jax.Array
  best: jax.Array
  eps_set_size: jax.Array
  certificate: jax.Array
  step_scale: jax.Array
  num_nonfinite: jax.Array
  update_finite: jax.Array


def init_beams(key: jax.Array, v: PyTree | Callable[[jax.Array], PyTree], K: int) -> PyTree:
  """Stacked beams from an initializer ``key -> v`` (K keys) or an already stacked pytree."""
  K = check_num_beams(K)
  if callable(v):
    beams = jax.vmap(v)(jax.random.split(key, K))
  else:
    beams = v
  check_leading_axis(beams, K, "the beams v")
  check_float_leaves(beams, "the beams v")
  return beams


def kbeam(
  f: Callable[..., jax.Array],
  leader: optax.GradientTransformation,
  follower: optax.GradientTransformation,
  *,
  rule: _rules.Rule = _rules.BEST,
  ascent_steps: int = 1,
  project_u: Callable[[PyTree], PyTree] | None = None,
  project_v: Callable[[PyTree], PyTree] | None = None,
  qp_steps: int | None = None,
  certificate_epsilon: float | None = None,
  sharded_beams: bool = False,
  **old_keywords: Any,
) -> Solver:
  r"""K-beam minimax solver for ``min_u max_v f(u, v, *args)``.

  Keeps K follower candidates ("beams") ``v_1..v_K`` stacked on a leading axis. Each
  step, at the current ``u``:

  1. min step: evaluate ``f(u, v_k)`` for all beams (one ``vmap``), form the direction
     ``z`` of ``rule`` from the gradients ``z_k = ∇_u f(u, v_k)`` of the ε-set
     ``R = {k : max_j f(u, v_j) - f(u, v_k) <= ε}``, and let ``leader`` step downhill
     on ``z`` (then ``project_u``);
  2. max step: every beam takes ``ascent_steps`` ascent steps of ``follower`` at the new
     ``u``, all beams in one ``vmap`` with a vmapped follower state (then ``project_v``).

  With K = 1, ``ascent_steps=1`` and any rule but ``Kiwiel`` (whose line search may shorten
  the step) this is exactly alternating gradient descent-ascent.

  The beam count can change without compiling again: ``init(..., num_active=n)`` (n may
  be a traced integer) uses only the first n of the K stacked beams; the others never
  enter the best beam, the ε-set or the certificate, and do not move. Non-finite values
  are handled the same way: a beam whose value is NaN or ±inf is left out (and counted
  in ``info.num_nonfinite``), and a non-finite step of the leader is skipped (and
  flagged in ``info.update_finite``).

  Rules are values that carry their behaviour (see ``kbeam_jax.minimax`` for the math):
  ``Best()`` (the basic K-beam step: the gradient at the best beam only), ``Random(ε)``
  (a random convex combination on R, Algorithm 2 of the paper), ``MinNorm(ε)`` (the
  minimum-norm element of the hull: steepest ε-descent), ``Kiwiel(ε, armijo, backtrack,
  max_backtracks)`` (Kiwiel's linearization weights, then an Armijo backtracking line
  search on ``F(u) = max_k f(u, v_k)``; a null step when no scale passes). An ε schedule
  that gives a negative or NaN ε at some step skips that step (``info.update_finite``).

  Args:
    f: objective ``f(u, v, *args) -> scalar``; ``u``, ``v`` any pytrees of floats.
    leader: optax optimizer for ``u`` (it receives ``z`` as the gradient).
    follower: optax optimizer for one beam (it receives ``-∇_v f``, so it ascends);
      its state is vmapped over the beams.
    rule: ``minimax.Best()`` (default), ``Random(ε)``, ``MinNorm(ε)`` or ``Kiwiel(ε, ...)``.
    ascent_steps: J, ascent steps per beam per iteration.
    project_u: optional projection applied to ``u`` after every step.
    project_v: optional projection applied to each beam after every ascent step.
    qp_steps: cap on the iterations of the exact simplex QP solver (``MinNorm``,
      ``Kiwiel`` and the ε-certificate; see ``minimax.simplex_qp``); default ``4K + 10``.
    certificate_epsilon: ``Best`` only: report the ε-certificate over the beams
      within this ε of the best (K gradients per step instead of one) instead of
      ``|∇_u f(u, v_best)|``. The ε-rules always report the certificate of their ε-set.
    sharded_beams: set when the beams are sharded across devices
      (``kbeam_jax.parallel``): ``Best`` then differentiates at every beam and
      combines the gradients with one-hot weights, so a step exchanges the K values and
      one leader-sized gradient between devices and never a beam's parameters (K
      gradients per step, K/n on each of n devices, instead of one).

  Returns:
    ``Solver(init, step)``:

    * ``init(key, u, v, num_beams, *, num_active=None) -> KBeamState``: ``v`` is either an
      initializer ``key -> v`` (called on K = ``num_beams`` split keys) or the K beams
      already stacked on a leading axis of size K; ``num_active`` (default K) take part.
    * ``step(state, *args) -> (KBeamState, KBeamInfo)``; ``args`` go to ``f``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import minimax
    >>> f = lambda u, v: -u ** 2 + v ** 2 + 2 * u * v  # anti-saddle, u* = 0
    >>> box = lambda x: jnp.clip(x, -0.5, 0.5)
    >>> solver = minimax.kbeam(f, optax.sgd(0.05), optax.sgd(0.05),
    ...                        project_u=box, project_v=box)
    >>> state = solver.init(jax.random.key(0), jnp.array(0.3),
    ...                     jnp.array([-0.4, -0.1, 0.2, 0.4]), num_beams=4)
    >>> state, trajectory = kbeam_jax.run(solver.step, state, 500)
    >>> bool(abs(state.u) < 0.02)
    True

  References:
    Hamm & Noh, K-Beam Minimax: Efficient Optimization for Deep Adversarial Learning,
    ICML 2018. Kiwiel, Methods of Descent for Nondifferentiable Optimization, 1985/87.
  """
  _common.reject_old_keywords("minimax.kbeam", old_keywords)
  check_optimizer("leader", leader)
  check_optimizer("follower", follower)
  rule = _rules.check_rule(rule)
  ascent_steps = _common.check_ascent_steps(ascent_steps)
  qp_steps = None if qp_steps is None else check_steps("qp_steps", qp_steps)
  if certificate_epsilon is not None:
    check_nonnegative("certificate_epsilon", certificate_epsilon)
  f = scalar_output(f, "the objective f(u, v)")
  project_u = checked_projection(project_u, "u")
  project_v = checked_projection(project_v, "v")

  def init(
    key: jax.Array, u: PyTree, v: Any, num_beams: int, *, num_active: Any = None
  ) -> KBeamState:
    check_float_leaves(u, "u")
    key, beam_key = jax.random.split(key)
    beams = init_beams(beam_key, v, num_beams)
    return KBeamState(
      u=u,
      beams=beams,
      leader_state=leader.init(u),
      follower_state=jax.vmap(follower.init)(beams),
      key=key,
      count=jnp.zeros([], jnp.int32),
      active=_common.active_mask(num_beams, num_active),
    )

  def step(state: KBeamState, *args: Any) -> tuple[KBeamState, KBeamInfo]:
    key, rule_key = jax.random.split(state.key)
    eps = rule.epsilon_at(state.count)
    d = direction(
      f,
      rule,
      state.u,
      state.beams,
      state.active,
      eps,
      rule_key,
      args,
      qp_steps,
      certificate_epsilon=certificate_epsilon,
      sharded_beams=sharded_beams,
    )
    u, leader_state = _common.descend(leader, d.z, state.leader_state, state.u, project_u)
    u, scale, first_grads = rule.search(f, state.u, u, state.beams, d, args, project_u)
    finite = d.any_valid & tree_all_finite(d.z) & tree_all_finite(u) & (eps >= 0)
    # Kiwiel: a non-finite z or u never passes Armijo, so then u is the old u already and
    # first_grads are the gradients there.
    u = _common.tree_where(finite, u, state.u)
    leader_state = _common.tree_where(finite, leader_state, state.leader_state)
    beams, follower_state = _common.ascend_beams(
      f, follower, project_v, ascent_steps, u, state.beams, state.follower_state, args, first_grads
    )
    beams = _common.keep_inactive(state.active, beams, state.beams)
    follower_state = _common.keep_inactive(state.active, follower_state, state.follower_state)
    new_state = KBeamState(
      u,
      beams,
      leader_state,
      follower_state,
      key,
      optax.safe_increment(state.count),
      state.active,
    )
    info = KBeamInfo(
      d.values,
      d.best,
      d.eps_set_size,
      d.certificate,
      jnp.where(finite, scale, 0.0).astype(d.values.dtype),
      d.num_nonfinite,
      finite,
    )
    return new_state, info

  return Solver(init, step)
