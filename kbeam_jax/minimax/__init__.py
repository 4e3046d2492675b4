"""Minimax optimization ``min_u max_v f(u, v)``: K-beam, its ε-subgradient rules, GDA.

Solvers share one pure API, ``solver.init(key, u, v, ...)`` and
``solver.step(state, *args) -> (state, info)`` (a ``kbeam_jax.Solver``);
``kbeam_jax.run`` drives N steps in one ``lax.scan``. ``scale_by_kbeam`` / ``kbeam_sgd``
are the optax form for the leader.

Direction rules of K-beam over the ε-set ``R = {k : f_max - f_k <= ε}`` of the beams,
``z_k = ∇_u f(u, v_k)``, step along ``-Σ λ_k z_k``; each rule is a value passed as
``kbeam(..., rule=...)``:

* ``Best()``: ``λ`` one-hot at the best beam;
* ``Random(ε)``: ``λ`` uniform on the simplex of ``R``;
* ``MinNorm(ε)``: ``λ`` minimizes ``|Σ λ_k z_k|`` (the certificate);
* ``Kiwiel(ε, armijo, backtrack, max_backtracks)``: ``λ`` maximizes
  ``Σ λ_k (f_k - f_max) - ½|Σ λ_k z_k|²``, then an Armijo line search.
"""

from kbeam_jax.minimax._gda import GDAInfo as GDAInfo
from kbeam_jax.minimax._gda import GDAState as GDAState
from kbeam_jax.minimax._gda import alternating_gda as alternating_gda
from kbeam_jax.minimax._gda import extragradient as extragradient
from kbeam_jax.minimax._gda import optimistic_gda as optimistic_gda
from kbeam_jax.minimax._gda import simultaneous_gda as simultaneous_gda
from kbeam_jax.minimax._kbeam import KBeamInfo as KBeamInfo
from kbeam_jax.minimax._kbeam import KBeamState as KBeamState
from kbeam_jax.minimax._kbeam import kbeam as kbeam
from kbeam_jax.minimax._rules import Best as Best
from kbeam_jax.minimax._rules import EpsilonRule as EpsilonRule
from kbeam_jax.minimax._rules import Kiwiel as Kiwiel
from kbeam_jax.minimax._rules import MinNorm as MinNorm
from kbeam_jax.minimax._rules import Random as Random
from kbeam_jax.minimax._rules import Rule as Rule
from kbeam_jax.minimax._rules import project_simplex as project_simplex
from kbeam_jax.minimax._rules import simplex_qp as simplex_qp
from kbeam_jax.minimax._transform import ScaleByKBeamState as ScaleByKBeamState
from kbeam_jax.minimax._transform import kbeam_sgd as kbeam_sgd
from kbeam_jax.minimax._transform import scale_by_kbeam as scale_by_kbeam

__all__ = [
  "Best",
  "EpsilonRule",
  "Kiwiel",
  "MinNorm",
  "Random",
  "Rule",
  "GDAInfo",
  "GDAState",
  "KBeamInfo",
  "KBeamState",
  "ScaleByKBeamState",
  "alternating_gda",
  "extragradient",
  "kbeam",
  "kbeam_sgd",
  "optimistic_gda",
  "project_simplex",
  "scale_by_kbeam",
  "simplex_qp",
  "simultaneous_gda",
]
