"""Bilevel optimization ``min_u f(u, v*(u))``, ``v*(u) = argmin_v g(u, v)``.

* Methods as values: ``Naive()``, ``FMD()``, ``RMD(checkpoint=...)``,
  ``ApproxGrad(solve_steps, solve_lr)``, ``CG(solve_steps, tol, damping)``,
  ``Neumann(solve_steps, solve_lr)`` and the inversion-free ``Penalty(...)``.
* ``argmin(g, u, v0, *args, method=, num_steps=, inner_lr=)``: T inner steps, and
  ``jax.grad`` goes through them by the method (implicit, unrolled, checkpointed).
* ``hypergradient(f, g, u, v0, *args, method=, ...) -> Hypergradient(grad, v)``.
* ``solver(f, g, upper, method, ...)`` (and ``penalty(...)``): the one outer solver, a
  ``kbeam_jax.Solver`` driven by ``kbeam_jax.run``.
* ``scale_by_hypergradient`` / ``scale_by_penalty``: the same as optax transforms
  (objectives as the extra arguments ``upper_fn=``, ``lower_fn=``).
"""

from kbeam_jax.bilevel._argmin import Hypergradient as Hypergradient
from kbeam_jax.bilevel._argmin import argmin as argmin
from kbeam_jax.bilevel._argmin import hypergradient as hypergradient
from kbeam_jax.bilevel._methods import CG as CG
from kbeam_jax.bilevel._methods import FMD as FMD
from kbeam_jax.bilevel._methods import RMD as RMD
from kbeam_jax.bilevel._methods import ApproxGrad as ApproxGrad
from kbeam_jax.bilevel._methods import Method as Method
from kbeam_jax.bilevel._methods import Naive as Naive
from kbeam_jax.bilevel._methods import Neumann as Neumann
from kbeam_jax.bilevel._methods import Penalty as Penalty
from kbeam_jax.bilevel._outer import BilevelState as BilevelState
from kbeam_jax.bilevel._outer import HypergradientInfo as HypergradientInfo
from kbeam_jax.bilevel._outer import PenaltyInfo as PenaltyInfo
from kbeam_jax.bilevel._outer import PenaltyLower as PenaltyLower
from kbeam_jax.bilevel._outer import penalty as penalty
from kbeam_jax.bilevel._outer import solver as solver
from kbeam_jax.bilevel._transform import ScaleByHypergradientState as ScaleByHypergradientState
from kbeam_jax.bilevel._transform import scale_by_hypergradient as scale_by_hypergradient
from kbeam_jax.bilevel._transform import scale_by_penalty as scale_by_penalty

__all__ = [
  "CG",
  "FMD",
  "RMD",
  "ApproxGrad",
  "BilevelState",
  "Hypergradient",
  "HypergradientInfo",
  "Method",
  "Naive",
  "Neumann",
  "Penalty",
  "PenaltyInfo",
  "PenaltyLower",
  "ScaleByHypergradientState",
  "argmin",
  "hypergradient",
  "penalty",
  "scale_by_hypergradient",
  "scale_by_penalty",
  "solver",
]
