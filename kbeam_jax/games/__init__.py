"""Games of N players, each minimizing its own loss: the seed's whole table.

A game is a sequence of N losses ``losses[i](players, *args) -> scalar`` over a tuple of
N pytrees; player i moves only ``players[i]``. Every solver is a ``kbeam_jax.Solver``
(``init(players)``, ``step(state, *args) -> (state, GameInfo)``, ``state.players``) driven
by ``kbeam_jax.run``, and uses only Jacobian-vector and vector-Jacobian products:

* ``gradient_play`` (naive learners, simultaneous or alternating), ``consensus``, ``sga``,
  ``lookahead``, ``lola``, ``sos``, ``cgd``: general-sum Nash learning;
* ``stackelberg``: a leader descending its total derivative through the follower's best
  response (``bilevel.argmin`` with any method); nested ``argmin`` gives multilevel
  programs (the guide's "Games" page, docs/pages/guide/games.md).

Two-player zero-sum games are the minimax family's special case: ``gradient_play`` on
``(f, -f)`` steps exactly like ``minimax.simultaneous_gda`` / ``alternating_gda``.
"""

from kbeam_jax.games._core import GameInfo as GameInfo
from kbeam_jax.games._core import GameState as GameState
from kbeam_jax.games._solvers import cgd as cgd
from kbeam_jax.games._solvers import consensus as consensus
from kbeam_jax.games._solvers import gradient_play as gradient_play
from kbeam_jax.games._solvers import lola as lola
from kbeam_jax.games._solvers import lookahead as lookahead
from kbeam_jax.games._solvers import sga as sga
from kbeam_jax.games._solvers import sos as sos
from kbeam_jax.games._stackelberg import stackelberg as stackelberg

__all__ = [
  "GameInfo",
  "GameState",
  "cgd",
  "consensus",
  "gradient_play",
  "lola",
  "lookahead",
  "sga",
  "sos",
  "stackelberg",
]
