r"""The differentiable games the game-dynamics literature tests on, as ``kbeam_jax.games``
losses: each ``losses[i](players, *args) -> scalar``, with its equilibrium and a metric.

* ``matching_pennies``: zero-sum, unique mixed Nash at ``p = (½, ½)`` (``θ = 0``);
* ``bilinear``: ``L_1 = xᵀy = -L_2``, a pure rotation (the Hamiltonian game);
* ``tandem``: ``L_1 = (x + y)² - 2x``, ``L_2 = (x + y)² - 2y``: a line of stable fixed
  points ``x + y = 1`` that LOLA's shaping leaves (Letcher et al. 2019);
* ``ipd``: the iterated prisoner's dilemma with its exact discounted value (Foerster et
  al. 2018): memory-one policies ``θ_i ∈ R⁵``;
* ``leader_follower``: a general-sum quadratic game whose Stackelberg point differs from
  its Nash point.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PAYOFFS = jnp.array([1.0, 3.0, 0.0, 2.0])  # the PD's losses for (CC, CD, DC, DD), player 1


def matching_pennies() -> list[Any]:
  """Player i plays heads with probability ``σ(θ_i)``; player 1 wins on a match.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.tasks import games
    >>> L = games.matching_pennies()
    >>> [float(l((jnp.array(0.0), jnp.array(0.0)))) for l in L]  # the mixed Nash point
    [0.0, 0.0]
  """
  M = jnp.array([[1.0, -1.0], [-1.0, 1.0]])

  def L1(players):
    p, q = jax.nn.sigmoid(players[0]), jax.nn.sigmoid(players[1])
    x, y = jnp.stack([p, 1 - p]), jnp.stack([q, 1 - q])
    return x @ M @ y

  return [L1, lambda players: -L1(players)]


def bilinear() -> list[Any]:
  """``L_1 = xᵀy``, ``L_2 = -xᵀy``: the Nash point is 0; naive play rotates around it.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.tasks import games
    >>> float(games.bilinear()[0]((jnp.ones(2), jnp.ones(2))))
    2.0
  """
  L1 = lambda players: jnp.vdot(players[0], players[1])
  return [L1, lambda players: -L1(players)]


def tandem() -> list[Any]:
  """``L_1 = (x + y)² - 2x``, ``L_2 = (x + y)² - 2y``; fixed points ``x + y = 1``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.tasks import games
    >>> [float(l((jnp.array(0.5), jnp.array(0.5)))) for l in games.tandem()]
    [0.0, 0.0]
  """
  s = lambda p: (p[0] + p[1]) ** 2
  return [lambda p: s(p) - 2 * p[0], lambda p: s(p) - 2 * p[1]]


def ipd(gamma: float = 0.96) -> list[Any]:
  r"""The iterated prisoner's dilemma with discount ``γ``, its exact expected loss.

  ``θ_i[0]``: the logit of cooperating first; ``θ_i[1:5]``: after the joint plays CC, CD,
  DC, DD (player 1's action first, for both players' policies). With ``P`` the
  Markov chain of the joint play and ``p_0`` its first state,
  ``L_i = p_0 (I - γP)⁻¹ r_i``; ``(1 - γ) L_i`` is the average loss per step (1 when both
  always cooperate, 2 when both always defect).

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.tasks import games
    >>> L = games.ipd()
    >>> cooperate = (jnp.full(5, 10.0), jnp.full(5, 10.0))
    >>> round(float(0.04 * L[0](cooperate)), 3)
    1.0
  """
  r1 = PAYOFFS
  r2 = PAYOFFS[jnp.array([0, 2, 1, 3])]

  def value(players):
    a, b = jax.nn.sigmoid(players[0]), jax.nn.sigmoid(players[1])
    joint = lambda p, q: jnp.stack([p * q, p * (1 - q), (1 - p) * q, (1 - p) * (1 - q)], -1)
    p0 = joint(a[0], b[0])
    P = joint(a[1:], b[1:])  # row: the last joint play; column: the next
    return jnp.linalg.solve((jnp.eye(4) - gamma * P).T, p0)  # p_0 (I - γP)⁻¹

  return [lambda p: value(p) @ r1, lambda p: value(p) @ r2]


def leader_follower() -> tuple[list[Any], dict[str, float]]:
  r"""``L_0 = ½(u - 1)² + uv``, ``L_1 = (v - u/2)²``: the follower's best response is
  ``v = u/2``. Nash: ``(2/3, 1/3)``, leader's loss ``5/18``; Stackelberg (the leader
  accounts for the response): ``(1/2, 1/4)``, leader's loss ``1/4``.

  Examples:
    >>> from kbeam_jax.tasks import games
    >>> losses, points = games.leader_follower()
    >>> points["stackelberg_u"], points["nash_u"]
    (0.5, 0.6666666666666666)
  """
  losses = [
    lambda p: 0.5 * (p[0] - 1.0) ** 2 + p[0] * p[1],
    lambda p: (p[1] - 0.5 * p[0]) ** 2,
  ]
  points = dict(nash_u=2 / 3, nash_v=1 / 3, nash_loss=5 / 18)
  points.update(stackelberg_u=0.5, stackelberg_v=0.25, stackelberg_loss=0.25)
  return losses, points
