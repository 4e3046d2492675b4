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
  check_num_beams,
  check_steps,
  scalar_output,
)
from kbeam_jax._solver import Solver
from kbeam_jax._tree import tree_vdot
from kbeam_jax.minimax import _common, _rules
from kbeam_jax.minimax._direction import direction

PyTree = Any


class KBeamState(NamedTuple):
  """State of the K-beam solver; ``beams`` and ``follower_state`` have a leading axis K."""

  u: PyTree
  beams: PyTree
  leader_state: Any
  follower_state: Any
  key: jax.Array
  count: jax.Array


class KBeamInfo(NamedTuple):
  """What one K-beam step saw, all measured at the ``u`` the step started from.

  Attributes:
    values: ``(K,)`` the objective at every beam, ``f(u, v_k)``.
    best: index of the best (largest-value) beam.
    eps_set_size: number of beams within ε of the best.
    certificate: norm of the minimum-norm element of the convex hull of the ε-set
      gradients ``∇_u f(u, v_k)``; 0 means ``u`` is stationary for ``max_k f(u, v_k)``.
      For rule ``best`` it is ``|∇_u f(u, v_best)|``.
    step_scale: the line-search scale accepted by rule ``kiwiel`` (0 = null step);
      1 for the other rules.
  """

  values: jax.Array
  best: jax.Array
  eps_set_size: jax.Array
  certificate: jax.Array
  step_scale: jax.Array


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
  num_ascent: int = 1,
  rule: str = "best",
  epsilon: float | Callable[[jax.Array], jax.Array] = 0.0,
  project_u: Callable[[PyTree], PyTree] | None = None,
  project_v: Callable[[PyTree], PyTree] | None = None,
  qp_iters: int = 300,
  armijo: float = 1e-4,
  backtrack: float = 0.5,
  max_backtracks: int = 10,
) -> Solver:
  r"""K-beam minimax solver for ``min_u max_v f(u, v, *args)``.

  Keeps K follower candidates ("beams") ``v_1..v_K`` stacked on a leading axis. Each
  step, at the current ``u``:

  1. min step: evaluate ``f(u, v_k)`` for all beams (one ``vmap``), form the direction
     ``z`` of ``rule`` from the gradients ``z_k = ∇_u f(u, v_k)`` of the ε-set
     ``R = {k : max_j f(u, v_j) - f(u, v_k) <= ε}``, and let ``leader`` step downhill
     on ``z`` (then ``project_u``);
  2. max step: every beam takes ``num_ascent`` ascent steps of ``follower`` at the new
     ``u``, all beams in one ``vmap`` with a vmapped follower state (then ``project_v``).

  With K = 1, ``num_ascent=1`` and any rule but ``kiwiel`` (whose line search may shorten
  the step) this is exactly alternating gradient descent-ascent.

  Rules (see ``kbeam_jax.minimax`` for the math): ``best`` (the basic K-beam step:
  gradient at the best beam only, ε must be 0), ``random`` (random convex combination
  on R, Algorithm 2 of the paper), ``min_norm`` (minimum-norm element of the hull:
  steepest ε-descent), ``kiwiel`` (Kiwiel's linearization weights, followed by an
  Armijo backtracking line search on ``F(u) = max_k f(u, v_k)`` over the scale of the
  leader's proposed step; if no scale passes, the step is null and ``u`` stays, while the
  leader's optimizer state keeps its update).

  Args:
    f: objective ``f(u, v, *args) -> scalar``; ``u``, ``v`` any pytrees of floats.
    leader: optax optimizer for ``u`` (it receives ``z`` as the gradient).
    follower: optax optimizer for one beam (it receives ``-∇_v f``, so it ascends);
      its state is vmapped over the beams.
    num_ascent: J, ascent steps per beam per iteration.
    rule: ``"best"``, ``"random"``, ``"min_norm"`` or ``"kiwiel"``.
    epsilon: ε >= 0, or a schedule ``count -> ε``; ignored by ``best``.
    project_u: optional projection applied to ``u`` after every step.
    project_v: optional projection applied to each beam after every ascent step.
    qp_iters: iterations of the simplex QP solver (``min_norm``, ``kiwiel`` and the
      certificate of the ε-rules).
    armijo: sufficient-decrease constant of the ``kiwiel`` line search.
    backtrack: factor by which the ``kiwiel`` line search shrinks the step.
    max_backtracks: number of scales the ``kiwiel`` line search tries (all evaluated
      in one vmap).

  Returns:
    ``Solver(init, step)``:

    * ``init(key, u, v, K) -> KBeamState``: ``v`` is either an initializer
      ``key -> v`` (called on K split keys) or the K beams already stacked on a
      leading axis of size K.
    * ``step(state, *args) -> (KBeamState, KBeamInfo)``; ``args`` go to ``f``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import minimax
    >>> f = lambda u, v: -u ** 2 + v ** 2 + 2 * u * v  # anti-saddle, u* = 0
    >>> box = lambda x: jnp.clip(x, -0.5, 0.5)
    >>> solver = minimax.kbeam(f, optax.sgd(0.05), optax.sgd(0.05),
    ...                        project_u=box, project_v=box)
    >>> state = solver.init(jax.random.key(0), jnp.array(0.3),
    ...                     jnp.array([-0.4, -0.1, 0.2, 0.4]), K=4)
    >>> state, trajectory = kbeam_jax.run(solver.step, state, 500)
    >>> bool(abs(state.u) < 0.02)
    True

  References:
    Hamm & Noh, K-Beam Minimax: Efficient Optimization for Deep Adversarial Learning,
    ICML 2018. Kiwiel, Methods of Descent for Nondifferentiable Optimization, 1985/87.
  """
  rule = _rules.check_rule(rule)
  _common.check_epsilon(epsilon)
  if rule == "best" and not callable(epsilon) and float(epsilon) != 0.0:
    raise ValueError(
      f"rule='best' uses the best beam only and needs epsilon=0, got epsilon={epsilon}. "
      "Pick rule='random', 'min_norm' or 'kiwiel' to use an ε-set."
    )
  num_ascent = _common.check_num_ascent(num_ascent)
  qp_iters = check_steps("qp_iters", qp_iters)
  max_backtracks = check_steps("max_backtracks", max_backtracks)
  if max_backtracks < 1:
    raise ValueError(f"max_backtracks must be >= 1, got max_backtracks={max_backtracks}.")
  f = scalar_output(f, "the objective f(u, v)")
  project_u = project_u or _common.identity
  project_v = project_v or _common.identity

  def init(key: jax.Array, u: PyTree, v: Any, K: int) -> KBeamState:
    check_float_leaves(u, "u")
    key, beam_key = jax.random.split(key)
    beams = init_beams(beam_key, v, K)
    return KBeamState(
      u=u,
      beams=beams,
      leader_state=leader.init(u),
      follower_state=jax.vmap(follower.init)(beams),
      key=key,
      count=jnp.zeros([], jnp.int32),
    )

  def line_search(state, d, u_new, args):
    """Largest scale ``t = backtrack**i`` whose point passes Armijo on ``max_k f``."""
    F = lambda u: jnp.max(
      jax.vmap(f, in_axes=(None, 0) + (None,) * len(args))(u, state.beams, *args)
    )
    scales = backtrack ** jnp.arange(max_backtracks, dtype=d.values.dtype)
    step = jax.tree.map(jnp.subtract, u_new, state.u)
    trial = jax.vmap(
      lambda t: project_u(jax.tree.map(lambda x, s: x + t.astype(x.dtype) * s, state.u, step))
    )(scales)
    F_trial = jax.vmap(F)(trial)
    moved = jax.vmap(lambda ut: tree_vdot(d.z, jax.tree.map(jnp.subtract, ut, state.u)))(trial)
    F0 = jnp.max(d.values)
    # Armijo on the aggregate gradient; a trial that does not move downhill along z is
    # never accepted (with momentum or Adam the proposed step need not follow -z).
    moved = moved.astype(F_trial.dtype)
    ok = (F_trial <= F0 + armijo * moved) & (moved < 0)
    first = jnp.argmax(ok)
    accepted = jnp.any(ok)
    chosen = jax.tree.map(lambda x: x[first], trial)
    u = jax.tree.map(
      lambda new, old: jnp.where(accepted, new, old).astype(old.dtype), chosen, state.u
    )
    return u, jnp.where(accepted, scales[first], 0.0)

  def step(state: KBeamState, *args: Any) -> tuple[KBeamState, KBeamInfo]:
    key, rule_key = jax.random.split(state.key)
    eps = _common.resolve_epsilon(epsilon, state.count)
    d = direction(f, rule, state.u, state.beams, eps, rule_key, args, qp_iters)
    u, leader_state = _common.descend(leader, d.z, state.leader_state, state.u, project_u)
    scale = jnp.ones([], d.values.dtype)
    if rule == "kiwiel":
      u, scale = line_search(state, d, u, args)
    beams, follower_state = _common.ascend_beams(
      f, follower, project_v, num_ascent, u, state.beams, state.follower_state, args
    )
    new_state = KBeamState(
      u, beams, leader_state, follower_state, key, optax.safe_increment(state.count)
    )
    info = KBeamInfo(d.values, d.best, d.eps_set_size, d.certificate, scale)
    return new_state, info

  return Solver(init, step)
