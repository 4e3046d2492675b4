"""Bilevel optimization ``min_u f(u, v*(u))``, ``v*(u) = argmin_v g(u, v)``.

Hypergradients through T inner descent steps (``fmd``, ``rmd``, ``approxgrad``, ``cg``,
``neumann``), each a pure function returning ``Hypergradient(grad, v_T)``; the
inversion-free ``penalty`` method as a pure solver; and both as optax transforms for the
upper variable (``scale_by_hypergradient``, ``scale_by_penalty``).
"""

from kbeam_jax.bilevel._hypergrad import Hypergradient as Hypergradient
from kbeam_jax.bilevel._hypergrad import approxgrad as approxgrad
from kbeam_jax.bilevel._hypergrad import cg as cg
from kbeam_jax.bilevel._hypergrad import fmd as fmd
from kbeam_jax.bilevel._hypergrad import inner_solve as inner_solve
from kbeam_jax.bilevel._hypergrad import neumann as neumann
from kbeam_jax.bilevel._hypergrad import rmd as rmd
from kbeam_jax.bilevel._penalty import BilevelSolver as BilevelSolver
from kbeam_jax.bilevel._penalty import PenaltyInfo as PenaltyInfo
from kbeam_jax.bilevel._penalty import PenaltyState as PenaltyState
from kbeam_jax.bilevel._penalty import penalty as penalty
from kbeam_jax.bilevel._transform import METHODS as METHODS
from kbeam_jax.bilevel._transform import ScaleByHypergradientState as ScaleByHypergradientState
from kbeam_jax.bilevel._transform import ScaleByPenaltyState as ScaleByPenaltyState
from kbeam_jax.bilevel._transform import scale_by_hypergradient as scale_by_hypergradient
from kbeam_jax.bilevel._transform import scale_by_penalty as scale_by_penalty

__all__ = [
  "METHODS",
  "BilevelSolver",
  "Hypergradient",
  "PenaltyInfo",
  "PenaltyState",
  "ScaleByHypergradientState",
  "ScaleByPenaltyState",
  "approxgrad",
  "cg",
  "fmd",
  "inner_solve",
  "neumann",
  "penalty",
  "rmd",
  "scale_by_hypergradient",
  "scale_by_penalty",
]
