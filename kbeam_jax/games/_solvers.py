r"""Learning dynamics for N-player general-sum games, each a ``kbeam_jax.Solver``.

With ``ξ`` the simultaneous gradient, ``H`` the game's Jacobian, ``H_o`` its off-diagonal
blocks, ``A = (H - Hᵀ)/2`` its antisymmetric part and ``χ = diag(H_oᵀ∇L)``:

* ``gradient_play``  every player on its own gradient ``ξ_i`` (naive learners);
* ``consensus``      ``ξ + γ Hᵀξ`` (Mescheder et al. 2017);
* ``sga``            ``ξ + λ Aᵀξ``, λ's sign aligned with the Hamiltonian's descent
  (Balduzzi et al. 2018);
* ``lookahead``      ``(I - αH_o) ξ`` (each player anticipates the others' naive step);
* ``lola``           ``(I - αH_o) ξ - αχ`` (exact-gradient LOLA, Foerster et al. 2018);
* ``sos``            ``(I - αH_o) ξ - pαχ``, ``p`` chosen to keep LookAhead's stability
  (Letcher et al. 2019);
* ``cgd``            ``(I + ηH_o)⁻¹ ξ``, a Krylov solve (Schäfer & Anandkumar 2019).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kbeam_jax._checks import check_nonnegative, check_optimizer, check_steps
from kbeam_jax._solver import Solver
from kbeam_jax._tree import tree_norm, tree_sq_norm, tree_vdot
from kbeam_jax.games._core import (
  GameInfo,
  GameState,
  Players,
  descend,
  direction_solver,
  game_info,
  make_game,
)

Losses = Sequence[Callable[..., jax.Array]]


def _add(a, b, scale=1.0):
  return jax.tree.map(lambda x, y: x + scale * y, a, b)


def _optimizers(optimizer: Any, n: int) -> tuple[optax.GradientTransformation, ...]:
  if isinstance(optimizer, optax.GradientTransformation):
    return (optimizer,) * n
  if isinstance(optimizer, Sequence) and len(optimizer) == n:
    for i, o in enumerate(optimizer):
      check_optimizer(f"optimizer[{i}]", o)
    return tuple(optimizer)
  if callable(optimizer):
    check_optimizer("optimizer", optimizer)  # the factory, not the optimizer: says so
  raise TypeError(
    f"optimizer must be one optax optimizer (each player gets its own state) or a sequence "
    f"of {n}, one per player; got {optimizer!r}."
  )


def gradient_play(losses: Losses, optimizer: Any, alternating: bool = False) -> Solver:
  r"""Naive learners: every player descends its own gradient ``∇_i L_i``.

  Simultaneously (all gradients at the same point) or, with ``alternating=True``, in
  turn: player 0 steps, then player 1 at the new point, and so on. In the two-player
  zero-sum case (``losses = (f, -f)``) this steps exactly like
  ``minimax.simultaneous_gda`` / ``minimax.alternating_gda``.

  Args:
    losses: N functions ``losses[i](players, *args) -> scalar``.
    optimizer: one optax optimizer, used for every player with its own state, or a
      sequence of N, one per player.
    alternating: players step in turn instead of simultaneously.

  Returns:
    ``Solver(init, step)``: ``init(players) -> GameState``, ``step(state, *args) ->
    (GameState, GameInfo)``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import games
    >>> # two players, each pulls its number toward half the other's plus one
    >>> losses = [lambda p: (p[0] - 0.5 * p[1] - 1.0) ** 2,
    ...           lambda p: (p[1] - 0.5 * p[0] - 1.0) ** 2]
    >>> solver = games.gradient_play(losses, optax.sgd(0.2))
    >>> state, info = kbeam_jax.run(solver.step, solver.init((jnp.array(0.0), jnp.array(0.0))), 200)
    >>> [round(float(p), 3) for p in state.players]  # the Nash point (2, 2)
    [2.0, 2.0]
  """
  game = make_game(losses)
  opts = _optimizers(optimizer, game.n)

  def init(players: Players) -> GameState:
    players = game.check(players)
    states = tuple(o.init(p) for o, p in zip(opts, players, strict=True))
    return GameState(players, states, jnp.zeros([], jnp.int32))

  def step(state: GameState, *args: Any) -> tuple[GameState, GameInfo]:
    xi = game.xi(state.players, args)
    players, states = list(state.players), list(state.opt_state)
    for i in range(game.n):
      grad = xi[i]
      if alternating and i > 0:  # at the point the earlier players have moved to
        grad = jax.grad(game.own(i, tuple(players), args))(players[i])
      players[i], states[i] = descend(opts[i], grad, states[i], players[i])
    info = game_info(game, state.players, xi, args)
    count = optax.safe_increment(state.count)
    return GameState(tuple(players), tuple(states), count), info

  return Solver(init, step)


def consensus(losses: Losses, lr: Any, gamma: float) -> Solver:
  r"""Consensus optimization: descend ``ξ + γ ∇(½|ξ|²) = ξ + γHᵀξ``.

  Args:
    losses: N functions ``losses[i](players, *args) -> scalar``.
    lr: the step size (a number or an optax schedule).
    gamma: γ >= 0, the weight of the Hamiltonian ``½|ξ|²``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import kbeam_jax
    >>> from kbeam_jax import games
    >>> bilinear = [lambda p: p[0] * p[1], lambda p: -p[0] * p[1]]  # naive play cycles
    >>> solver = games.consensus(bilinear, lr=0.1, gamma=1.0)
    >>> state, _ = kbeam_jax.run(solver.step, solver.init((jnp.array(1.0), jnp.array(1.0))), 300)
    >>> [round(abs(float(p)), 3) for p in state.players]
    [0.0, 0.0]

  References:
    Mescheder, Nowozin & Geiger, The Numerics of GANs, NeurIPS 2017.
  """
  game = make_game(losses)
  check_nonnegative("gamma", gamma)

  def direction(players, args):
    xi = game.xi(players, args)
    return _add(xi, game.htvp(players, xi, args), gamma), xi, None

  return direction_solver(game, lr, direction)


def sga(losses: Losses, lr: Any, lam: float = 1.0, align: bool = True) -> Solver:
  r"""Symplectic gradient adjustment: descend ``ξ + λ Aᵀξ``, ``Aᵀξ = ½(Hᵀξ - Hξ)``.

  With ``align=True`` the sign of λ follows Balduzzi et al.'s alignment,
  ``sign(⟨ξ, Hᵀξ⟩⟨Aᵀξ, Hᵀξ⟩ / d + 1/10)`` (``d`` the number of parameters): towards
  stable fixed points, away from unstable ones.

  Args:
    losses: N functions ``losses[i](players, *args) -> scalar``.
    lr: the step size (a number or an optax schedule).
    lam: λ >= 0, the adjustment's magnitude.
    align: choose λ's sign by the alignment rule (else λ as given).

  Examples:
    >>> import jax.numpy as jnp
    >>> import kbeam_jax
    >>> from kbeam_jax import games
    >>> bilinear = [lambda p: p[0] * p[1], lambda p: -p[0] * p[1]]
    >>> solver = games.sga(bilinear, lr=0.1)
    >>> state, _ = kbeam_jax.run(solver.step, solver.init((jnp.array(1.0), jnp.array(1.0))), 300)
    >>> [round(abs(float(p)), 3) for p in state.players]
    [0.0, 0.0]

  References:
    Balduzzi et al., The Mechanics of n-Player Differentiable Games, ICML 2018.
  """
  game = make_game(losses)
  check_nonnegative("lam", lam)

  def direction(players, args):
    xi = game.xi(players, args)
    ht_xi = game.htvp(players, xi, args)
    h_xi = game.hvp(players, xi, args)
    at_xi = jax.tree.map(lambda a, b: 0.5 * (a - b), ht_xi, h_xi)
    sign = 1.0
    if align:
      d = sum(x.size for x in jax.tree.leaves(players))
      sign = jnp.sign(tree_vdot(xi, ht_xi) * tree_vdot(at_xi, ht_xi) / d + 0.1)
    return _add(xi, at_xi, lam * sign), xi, None

  return direction_solver(game, lr, direction)


def _lookahead(game, players, args, lookahead_lr):
  xi = game.xi(players, args)
  return xi, _add(xi, game.off_diagonal_hvp(players, xi, args), -lookahead_lr)


def lookahead(losses: Losses, lr: Any, lookahead_lr: float) -> Solver:
  r"""LookAhead: each player descends ``(I - αH_o) ξ``, anticipating the others' naive
  step of size α without shaping it.

  Args:
    losses: N functions ``losses[i](players, *args) -> scalar``.
    lr: the step size (a number or an optax schedule).
    lookahead_lr: α >= 0, the anticipated step of the other players.

  References:
    Zhang & Lesser, Multi-Agent Learning with Policy Prediction, AAAI 2010; Letcher et
    al., Stable Opponent Shaping in Differentiable Games, ICLR 2019.
  """
  game = make_game(losses)
  check_nonnegative("lookahead_lr", lookahead_lr)

  def direction(players, args):
    xi, d = _lookahead(game, players, args, lookahead_lr)
    return d, xi, None

  return direction_solver(game, lr, direction)


def lola(losses: Losses, lr: Any, lookahead_lr: float) -> Solver:
  r"""Exact-gradient LOLA: ``(I - αH_o) ξ - αχ``, each player differentiating through the
  others' anticipated naive step (the shaping term ``χ = diag(H_oᵀ∇L)``).

  Args:
    losses: N functions ``losses[i](players, *args) -> scalar``.
    lr: the step size (a number or an optax schedule).
    lookahead_lr: α >= 0, the anticipated step of the other players.

  References:
    Foerster et al., Learning with Opponent-Learning Awareness, AAMAS 2018.
  """
  game = make_game(losses)
  check_nonnegative("lookahead_lr", lookahead_lr)

  def direction(players, args):
    xi, d = _lookahead(game, players, args, lookahead_lr)
    return _add(d, game.shaping(players, args), -lookahead_lr), xi, None

  return direction_solver(game, lr, direction)


def sos(losses: Losses, lr: Any, lookahead_lr: float, a: float = 0.5, b: float = 0.1) -> Solver:
  r"""Stable opponent shaping: ``ξ₀ - pαχ`` with ``ξ₀ = (I - αH_o) ξ`` (LookAhead).

  ``p = min(p₁, p₂)``: ``p₁ = 1`` if ``⟨-αχ, ξ₀⟩ >= 0``, else ``min(1, -a|ξ₀|² /
  ⟨-αχ, ξ₀⟩)`` (the shaping never turns ξ₀ by more than the angle ``a`` allows);
  ``p₂ = |ξ|²`` when ``|ξ| < b``, else 1 (the shaping fades near fixed points, where
  LookAhead's stability guarantees take over).

  Args:
    losses: N functions ``losses[i](players, *args) -> scalar``.
    lr: the step size (a number or an optax schedule).
    lookahead_lr: α >= 0.
    a: in (0, 1), the alignment bound.
    b: > 0, the gradient norm below which shaping fades.

  References:
    Letcher et al., Stable Opponent Shaping in Differentiable Games, ICLR 2019.
  """
  game = make_game(losses)
  check_nonnegative("lookahead_lr", lookahead_lr)
  if not 0 < a < 1:
    raise ValueError(f"a must be in (0, 1), got a={a!r}.")
  if not b > 0:
    raise ValueError(f"b must be > 0, got b={b!r}.")

  def direction(players, args):
    xi, xi0 = _lookahead(game, players, args, lookahead_lr)
    chi = game.shaping(players, args)
    dot = -lookahead_lr * tree_vdot(chi, xi0)
    safe = jnp.where(dot < 0, dot, -1.0)
    p1 = jnp.where(dot >= 0, 1.0, jnp.minimum(1.0, -a * tree_sq_norm(xi0) / safe))
    norm = tree_norm(xi)
    p2 = jnp.where(norm < b, norm**2, 1.0)
    p = jnp.minimum(p1, p2)
    return _add(xi0, chi, -p * lookahead_lr), xi, None

  return direction_solver(game, lr, direction)


def cgd(losses: Losses, lr: float, *, solve_steps: int = 50, tol: float = 1e-6) -> Solver:
  r"""Competitive gradient descent: ``θ ← θ - η (I + ηH_o)⁻¹ ξ``.

  For two players (``x`` minimizing ``f``, ``y`` minimizing ``g``) this is Schäfer &
  Anandkumar's update, the Nash equilibrium of the players' local bilinear approximations:
  ``Δx = -η(I - η²D_xy f D_yx g)⁻¹(∇_x f - ηD_xy f ∇_y g)`` (and symmetrically), general sum.
  The block system ``(I + ηH_o) d = ξ`` is solved by GMRES (``jax.scipy``) on products with
  ``H_o`` (Jacobian-vector products), to a relative residual ``tol``, restarted every
  ``min(solve_steps, 20)`` iterations for ``ceil(solve_steps / restart)`` cycles (so at
  most ``solve_steps`` rounded up to a whole cycle: 60 for the default 50);
  ``info.status`` is the achieved relative residual. The same
  formula serves N players.

  Args:
    losses: N functions ``losses[i](players, *args) -> scalar``.
    lr: η > 0, the step size (also the interaction's weight in the system).
    solve_steps: the GMRES iteration budget, >= 1 (rounded up to whole restart cycles).
    tol: relative residual of the solve, > 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> import kbeam_jax
    >>> from kbeam_jax import games
    >>> bilinear = [lambda p: p[0] * p[1], lambda p: -p[0] * p[1]]
    >>> solver = games.cgd(bilinear, lr=0.5)
    >>> state, _ = kbeam_jax.run(solver.step, solver.init((jnp.array(1.0), jnp.array(1.0))), 100)
    >>> [round(abs(float(p)), 3) for p in state.players]
    [0.0, 0.0]

  References:
    Schäfer & Anandkumar, Competitive Gradient Descent, NeurIPS 2019.
  """
  game = make_game(losses)
  solve_steps = check_steps("solve_steps", solve_steps)
  if solve_steps < 1:
    raise ValueError(f"solve_steps must be >= 1, got {solve_steps}.")
  if not (isinstance(tol, int | float) and tol > 0):
    raise ValueError(f"tol must be a number > 0, got tol={tol!r}.")
  if not (isinstance(lr, int | float) and lr > 0):
    raise ValueError(f"cgd's lr must be a number > 0 (it weights the system too), got {lr!r}.")
  restart = min(solve_steps, 20)
  cycles = -(-solve_steps // restart)

  def direction(players, args):
    xi = game.xi(players, args)
    matvec = lambda d: _add(d, game.off_diagonal_hvp(players, d, args), lr)
    d, _ = jax.scipy.sparse.linalg.gmres(
      matvec, xi, xi, tol=tol, atol=0.0, restart=restart, maxiter=cycles
    )
    residual = tree_norm(jax.tree.map(jnp.subtract, matvec(d), xi)) / jnp.maximum(
      tree_norm(xi), jnp.finfo(jnp.result_type(*jax.tree.leaves(xi))).tiny
    )
    return d, xi, residual

  return direction_solver(game, lr, direction)
