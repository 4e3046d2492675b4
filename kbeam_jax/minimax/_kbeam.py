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
  checked_projection,
  scalar_output,
)
from kbeam_jax._solver import Solver
from kbeam_jax._tree import tree_vdot
from kbeam_jax.minimax import _common, _rules
from kbeam_jax.minimax._direction import direction

PyTree = Any


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
    eps_set_size: number of beams within ε of the best (rule ``best``: tied with it).
    certificate: the ε-certificate, the norm of the minimum-norm element of the convex
      hull of the ε-set's gradients ``∇_u f(u, v_k)``; 0 means ``u`` is stationary for
      ``max_k f(u, v_k)`` up to ε. Under rule ``best`` it is ``|∇_u f(u, v_best)|``,
      which does not go to 0 at a nonsmooth minimax point (two beams tied at the max
      with opposite gradients), unless ``certificate_epsilon`` asks for the
      ε-certificate. NaN when no beam was valid (nothing was measured), never 0.
    step_scale: the line-search scale accepted by rule ``kiwiel`` (0 = null step);
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
  num_ascent: int = 1,
  rule: str = "best",
  epsilon: float | Callable[[jax.Array], jax.Array] = 0.0,
  project_u: Callable[[PyTree], PyTree] | None = None,
  project_v: Callable[[PyTree], PyTree] | None = None,
  qp_iters: int | None = None,
  armijo: float = 1e-4,
  backtrack: float = 0.5,
  max_backtracks: int = 10,
  certificate_epsilon: float | None = None,
  sharded_beams: bool = False,
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

  The beam count can change without compiling again: ``init(..., num_active=n)`` (n may
  be a traced integer) uses only the first n of the K stacked beams; the others never
  enter the best beam, the ε-set or the certificate, and do not move. Non-finite values
  are handled the same way: a beam whose value is NaN or ±inf is left out (and counted
  in ``info.num_nonfinite``), and a non-finite step of the leader is skipped (and
  flagged in ``info.update_finite``).

  Rules (see ``kbeam_jax.minimax`` for the math): ``best`` (the basic K-beam step:
  gradient at the best beam only, ε must be 0), ``random`` (random convex combination
  on R, Algorithm 2 of the paper), ``min_norm`` (minimum-norm element of the hull:
  steepest ε-descent), ``kiwiel`` (Kiwiel's linearization weights, followed by an
  Armijo backtracking line search on ``F(u) = max_k f(u, v_k)`` over the scale of the
  leader's proposed step; if no scale passes, the step is null and ``u`` stays, while the
  leader's optimizer state keeps its update). The line search tries the scales one at
  a time and stops at the first that passes (usually the first); its evaluation of the
  beams at the accepted point also gives the beams' next ascent gradients.

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
    qp_iters: cap on the iterations of the exact simplex QP solver (``min_norm``,
      ``kiwiel`` and the ε-certificate; see ``minimax.simplex_qp``); default ``4K + 10``.
    armijo: sufficient-decrease constant of the ``kiwiel`` line search.
    backtrack: factor by which the ``kiwiel`` line search shrinks the step.
    max_backtracks: most scales the ``kiwiel`` line search tries before the null step.
    certificate_epsilon: rule ``best`` only: report the ε-certificate over the beams
      within this ε of the best (K gradients per step instead of one) instead of
      ``|∇_u f(u, v_best)|``. The ε-rules always report the certificate of their ε-set.
    sharded_beams: set when the beams are sharded across devices
      (``kbeam_jax.parallel``): rule ``best`` then differentiates at every beam and
      combines the gradients with one-hot weights, so a step exchanges the K values and
      one leader-sized gradient between devices and never a beam's parameters (K
      gradients per step, K/n on each of n devices, instead of one).

  Returns:
    ``Solver(init, step)``:

    * ``init(key, u, v, K, *, num_active=None) -> KBeamState``: ``v`` is either an
      initializer ``key -> v`` (called on K split keys) or the K beams already stacked
      on a leading axis of size K; ``num_active`` (default K) beams take part.
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
  qp_iters = None if qp_iters is None else check_steps("qp_iters", qp_iters)
  if certificate_epsilon is not None:
    _common.check_epsilon(certificate_epsilon)
  max_backtracks = check_steps("max_backtracks", max_backtracks)
  if max_backtracks < 1:
    raise ValueError(f"max_backtracks must be >= 1, got max_backtracks={max_backtracks}.")
  f = scalar_output(f, "the objective f(u, v)")
  project_u = checked_projection(project_u, "u")
  project_v = checked_projection(project_v, "v")

  def init(key: jax.Array, u: PyTree, v: Any, K: int, *, num_active: Any = None) -> KBeamState:
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
      active=_common.active_mask(K, num_active),
    )

  def line_search(state, d, u_new, args):
    """Largest scale ``t = backtrack**i`` whose point passes Armijo on ``max_k f``.

    Scales are tried one at a time (a ``while_loop``); if none passes, a last trial at
    ``t = 0`` keeps ``u`` (the null step). Each trial evaluates ``f`` and ``∇_v f`` at
    every beam: at the accepted point these are the gradients of the beams' next ascent
    step, which then needs no evaluation of its own. A step whose first scale passes
    costs one evaluation of the beams, as a plain step's ascent does.

    Returns:
      ``(u, scale, ∇_v f(u, v_k) for every beam)``.
    """
    dtype = d.values.dtype
    evaluate = jax.vmap(jax.value_and_grad(f, argnums=1), in_axes=(None, 0) + (None,) * len(args))
    F0 = jnp.max(jnp.where(d.valid, d.values, -jnp.inf))
    step = jax.tree.map(jnp.subtract, u_new, state.u)

    def attempt(i):
      last = i == max_backtracks
      t = jnp.where(last, 0.0, jnp.asarray(backtrack, dtype) ** i)
      trial = project_u(jax.tree.map(lambda x, s: x + t.astype(x.dtype) * s, state.u, step))
      trial = _common.tree_where(last, state.u, trial)
      values, grads = evaluate(trial, state.beams, *args)
      moved = tree_vdot(d.z, jax.tree.map(jnp.subtract, trial, state.u)).astype(dtype)
      # Armijo on the aggregate gradient; a trial that does not move downhill along z is
      # never accepted (with momentum or Adam the proposed step need not follow -z).
      F = jnp.max(jnp.where(d.valid, values, -jnp.inf))
      ok = ((F <= F0 + armijo * moved) & (moved < 0)) | last
      return i + 1, ok, trial, t, grads

    # The first scale outside the loop (straight-line code that XLA fuses with the rest of
    # the step); the loop runs only when it fails.
    first = attempt(jnp.zeros([], jnp.int32))
    _, _, u, t, grads = jax.lax.while_loop(lambda c: ~c[1], lambda c: attempt(c[0]), first)
    return u, t, grads

  def step(state: KBeamState, *args: Any) -> tuple[KBeamState, KBeamInfo]:
    key, rule_key = jax.random.split(state.key)
    eps = _common.resolve_epsilon(epsilon, state.count)
    d = direction(
      f,
      rule,
      state.u,
      state.beams,
      state.active,
      eps,
      rule_key,
      args,
      qp_iters,
      certificate_epsilon=certificate_epsilon,
      sharded_beams=sharded_beams,
    )
    u, leader_state = _common.descend(leader, d.z, state.leader_state, state.u, project_u)
    scale, first_grads = jnp.ones([], d.values.dtype), None
    if rule == "kiwiel":
      u, scale, first_grads = line_search(state, d, u, args)
    finite = d.any_valid & _common.tree_all_finite(d.z) & _common.tree_all_finite(u)
    # kiwiel: a non-finite z or u never passes Armijo, so then u is the old u already and
    # first_grads are the gradients there.
    u = _common.tree_where(finite, u, state.u)
    leader_state = _common.tree_where(finite, leader_state, state.leader_state)
    beams, follower_state = _common.ascend_beams(
      f, follower, project_v, num_ascent, u, state.beams, state.follower_state, args, first_grads
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
