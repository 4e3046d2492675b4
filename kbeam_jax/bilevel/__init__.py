"""Bilevel optimization ``min_u f(u, v*(u))``, ``v*(u) = argmin_v g(u, v)``.

* Methods as values, each owning how it differentiates a lower solve: ``Naive()``,
  ``FMD()``, ``RMD(checkpoint=...)``, and the implicit ``ApproxGrad(...)``, ``CG(...)``,
  ``Neumann(...)`` (or your own ``Implicit`` subclass: one ``linear_solve`` method).
* ``argmin(g, u, v0, *args, method=, ...)``, ``root(F, ...)``, ``fixed_point(T, ...)``:
  a forward solve (the built-in loop or your ``solve=``) whose answer ``jax.grad``,
  ``jax.jvp``, ``jax.hessian`` ... differentiate by the method; ``return_info=True`` for a
  ``SolveInfo``, ``throw=True`` to raise on failure.
* ``hypergradient(f, g, u, v0, *args, method=, ...) -> Hypergradient(grad, v, info)``.
* ``solver(f, g, upper, method, ...)``: the outer hypergradient solver; ``penalty(f, g,
  upper, ...)``: the inversion-free penalty method; both ``kbeam_jax.Solver``s.
* ``scale_by_hypergradient`` / ``scale_by_penalty``: the same as optax transforms
  (objectives as the extra arguments ``upper_fn=``, ``lower_fn=``).
* ``max_curvature(g, u, v)``: ``λ_max(∇²_vv g)`` by power iteration (stable steps).
"""

from kbeam_jax.bilevel._argmin import argmin as argmin
from kbeam_jax.bilevel._argmin import fixed_point as fixed_point
from kbeam_jax.bilevel._argmin import max_curvature as max_curvature
from kbeam_jax.bilevel._argmin import root as root
from kbeam_jax.bilevel._hypergradient import Hypergradient as Hypergradient
from kbeam_jax.bilevel._hypergradient import HypergradientInfo as HypergradientInfo
from kbeam_jax.bilevel._hypergradient import hypergradient as hypergradient
from kbeam_jax.bilevel._linear_solvers import CG as CG
from kbeam_jax.bilevel._linear_solvers import ApproxGrad as ApproxGrad
from kbeam_jax.bilevel._linear_solvers import Neumann as Neumann
from kbeam_jax.bilevel._methods import Implicit as Implicit
from kbeam_jax.bilevel._methods import Method as Method
from kbeam_jax.bilevel._methods import Naive as Naive
from kbeam_jax.bilevel._outer import BilevelState as BilevelState
from kbeam_jax.bilevel._outer import solver as solver
from kbeam_jax.bilevel._penalty import PenaltyInfo as PenaltyInfo
from kbeam_jax.bilevel._penalty import PenaltyLower as PenaltyLower
from kbeam_jax.bilevel._penalty import PenaltySchedule as PenaltySchedule
from kbeam_jax.bilevel._penalty import PenaltyState as PenaltyState
from kbeam_jax.bilevel._penalty import penalty as penalty
from kbeam_jax.bilevel._status import SolveInfo as SolveInfo
from kbeam_jax.bilevel._transform import ScaleByHypergradientState as ScaleByHypergradientState
from kbeam_jax.bilevel._transform import ScaleByPenaltyState as ScaleByPenaltyState
from kbeam_jax.bilevel._transform import scale_by_hypergradient as scale_by_hypergradient
from kbeam_jax.bilevel._transform import scale_by_penalty as scale_by_penalty
from kbeam_jax.bilevel._unrolled import FMD as FMD
from kbeam_jax.bilevel._unrolled import RMD as RMD

__all__ = [
  "CG",
  "FMD",
  "RMD",
  "ApproxGrad",
  "BilevelState",
  "Hypergradient",
  "HypergradientInfo",
  "Implicit",
  "Method",
  "Naive",
  "Neumann",
  "PenaltyInfo",
  "PenaltyLower",
  "PenaltySchedule",
  "PenaltyState",
  "ScaleByHypergradientState",
  "ScaleByPenaltyState",
  "SolveInfo",
  "argmin",
  "fixed_point",
  "hypergradient",
  "max_curvature",
  "penalty",
  "root",
  "scale_by_hypergradient",
  "scale_by_penalty",
  "solver",
]
