r"""N-player differentiable games: the game, its products, and the solver skeleton.

A game is a sequence of N losses; ``losses[i](players, *args)`` is player i's scalar loss,
``players`` a tuple of N pytrees, and player i moves only ``players[i]``. With
``ξ = (∇_1 L_1, ..., ∇_N L_N)`` the simultaneous gradient and ``H = ∂ξ/∂θ`` the game's
Jacobian (block ``H_ij = ∇_j ∇_i L_i``), every solver needs only products:

* ``H v`` — one ``jax.jvp`` of ``ξ``; ``Hᵀ v`` — one ``jax.vjp`` of ``ξ``;
* ``H_o v`` (the off-diagonal blocks, ``H v`` without ``H_ii v_i``) — a ``jvp`` of each
  ``ξ_i`` with player i's own tangent set to zero;
* ``χ = diag(H_oᵀ ∇L)`` (LOLA's shaping term) — ``χ_i = ∇_i Σ_{j≠i} ⟨ξ_j, sg(∇_j L_i)⟩``.

Never a dense Jacobian or Hessian.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kbeam_jax._checks import check_float_leaves, scalar_output
from kbeam_jax._solver import Solver
from kbeam_jax._tree import PyTree, tree_norm, tree_vdot

Players = tuple[PyTree, ...]


class GameState(NamedTuple):
  """State of a game solver: the players, the optimizer state, the step count."""

  players: Players
  opt_state: Any
  count: jax.Array


class GameInfo(NamedTuple):
  """What a step saw at the players it started from.

  Attributes:
    losses: each player's loss, shape ``(N,)``.
    grad_norms: ``|∇_i L_i|`` of each player, shape ``(N,)`` (for ``stackelberg``'s
      leader: the norm of its hypergradient, the total derivative through the followers).
    status: solver-specific extras (``None`` for most; the Stackelberg leader's
      hypergradient status, CGD's linear-solve residual).
  """

  losses: jax.Array
  grad_norms: jax.Array
  status: Any = None


class Game(NamedTuple):
  """Validated losses and the products every solver builds on."""

  losses: tuple[Callable[..., jax.Array], ...]

  @property
  def n(self) -> int:
    return len(self.losses)

  def check(self, players: Any) -> Players:
    if not isinstance(players, tuple | list) or len(players) != self.n:
      size = len(players) if hasattr(players, "__len__") else "?"
      raise ValueError(
        f"players must be a tuple of {self.n} pytrees (one per loss), got "
        f"{type(players).__name__} of length {size}."
      )
    players = tuple(players)
    for i, p in enumerate(players):
      check_float_leaves(p, f"players[{i}]")
    return players

  def values(self, players: Players, args) -> jax.Array:
    return jnp.stack([L(players, *args) for L in self.losses])

  def own(self, i: int, players: Players, args) -> Callable[[PyTree], jax.Array]:
    """Player i's loss as a function of its own parameters."""
    return lambda p: self.losses[i](_replace(players, i, p), *args)

  def xi(self, players: Players, args) -> Players:
    """The simultaneous gradient ``ξ``."""
    return tuple(jax.grad(self.own(i, players, args))(players[i]) for i in range(self.n))

  def grads_of(self, i: int, players: Players, args) -> Players:
    """``∇L_i`` with respect to every player (``∇_j L_i`` for all j)."""
    return jax.grad(lambda ps: self.losses[i](ps, *args))(players)

  def hvp(self, players: Players, v: Players, args) -> Players:
    """``H v``."""
    return jax.jvp(lambda ps: self.xi(ps, args), (players,), (v,))[1]

  def htvp(self, players: Players, v: Players, args) -> Players:
    """``Hᵀ v``."""
    return jax.vjp(lambda ps: self.xi(ps, args), players)[1](v)[0]

  def off_diagonal_hvp(self, players: Players, v: Players, args) -> Players:
    """``H_o v``: ``(H_o v)_i = Σ_{j≠i} ∇_j ∇_i L_i · v_j``."""
    out = []
    for i in range(self.n):
      grad_i = lambda ps, i=i: jax.grad(self.own(i, ps, args))(ps[i])
      tangent = _replace(v, i, jax.tree.map(jnp.zeros_like, v[i]))
      out.append(jax.jvp(grad_i, (players,), (tangent,))[1])
    return tuple(out)

  def shaping(self, players: Players, args) -> Players:
    """LOLA's ``χ``: ``χ_i = ∇_i Σ_{j≠i} ⟨ξ_j, sg(∇_j L_i)⟩``."""
    out = []
    for i in range(self.n):
      cross = jax.lax.stop_gradient(self.grads_of(i, players, args))

      def term(p_i, i=i, cross=cross):
        ps = _replace(players, i, p_i)
        xi = self.xi(ps, args)
        return sum(tree_vdot(xi[j], cross[j]) for j in range(self.n) if j != i)

      out.append(jax.grad(term)(players[i]))
    return tuple(out)


def _replace(players: Players, i: int, value: PyTree) -> Players:
  return tuple(value if j == i else p for j, p in enumerate(players))


def make_game(losses: Sequence[Callable[..., jax.Array]]) -> Game:
  """Checks ``losses``: a sequence of functions ``(players, *args) -> scalar`` (one is plain
  optimization, a top level over nested ``bilevel.argmin``, say)."""
  if callable(losses) or not isinstance(losses, Sequence) or len(losses) < 1:
    raise TypeError(
      "losses must be a sequence of N >= 1 functions, losses[i](players, *args) -> player "
      f"i's scalar loss; got {losses!r}."
    )
  for i, L in enumerate(losses):
    if not callable(L):
      raise TypeError(f"losses[{i}] must be a function (players, *args) -> scalar, got {L!r}.")
  return Game(tuple(scalar_output(L, f"losses[{i}](players)") for i, L in enumerate(losses)))


def game_info(game: Game, players: Players, xi: Players, args, status=None) -> GameInfo:
  values = game.values(players, args)
  norms = jnp.stack([tree_norm(x).astype(values.dtype) for x in xi])
  return GameInfo(values, norms, status)


def descend(opt: optax.GradientTransformation, direction: Players, opt_state, players: Players):
  updates, opt_state = opt.update(direction, opt_state, players)
  return optax.apply_updates(players, updates), opt_state


def direction_solver(
  game: Game,
  lr: Any,
  direction: Callable[[Players, tuple], tuple[Players, Players, Any]],
) -> Solver:
  """A solver that steps ``θ ← θ - lr·d`` along ``d, ξ, status = direction(players, args)``
  (``lr`` a number or an optax schedule)."""
  opt = optax.sgd(lr)

  def init(players: Players) -> GameState:
    players = game.check(players)
    return GameState(players, opt.init(players), jnp.zeros([], jnp.int32))

  def step(state: GameState, *args: Any) -> tuple[GameState, GameInfo]:
    d, xi, status = direction(state.players, args)
    d = jax.tree.map(lambda a, p: a.astype(jnp.result_type(p)), d, state.players)
    players, opt_state = descend(opt, d, state.opt_state, state.players)
    info = game_info(game, state.players, xi, args, status)
    return GameState(players, opt_state, optax.safe_increment(state.count)), info

  return Solver(init, step)
