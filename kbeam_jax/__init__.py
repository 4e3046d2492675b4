"""kbeam_jax: K-beam minimax and bilevel optimization in JAX.

Subpackages: ``kbeam_jax.minimax`` (K-beam, ε-subgradient rules, GDA baselines, optax
forms), ``kbeam_jax.bilevel`` (hypergradient methods, differentiable ``argmin`` / ``root``
/ ``fixed_point``, the penalty method, optax forms), ``kbeam_jax.games`` (N-player games,
Stackelberg leaders), ``kbeam_jax.derivatives`` (Hessian-vector products),
``kbeam_jax.nn`` (Flax helpers), ``kbeam_jax.data`` (loaders), ``kbeam_jax.tasks`` (the
papers' problems) and ``kbeam_jax.parallel`` (meshes and shardings for several devices).
Every solver is a ``Solver(init, step)``; ``run`` drives one.

``kbeam_jax.nn``, ``kbeam_jax.data`` and ``kbeam_jax.tasks`` are imported on first use
(``import kbeam_jax`` then ``kbeam_jax.nn.stack_modules`` works): ``kbeam_jax.nn`` brings
in ``flax.nnx``, which takes the import from 0.5 s to 1.7 s (``python -X importtime``).
"""

import importlib

from kbeam_jax import bilevel as bilevel
from kbeam_jax import derivatives as derivatives
from kbeam_jax import games as games
from kbeam_jax import minimax as minimax
from kbeam_jax import parallel as parallel
from kbeam_jax._solver import Solver as Solver
from kbeam_jax._solver import SolverWarning as SolverWarning
from kbeam_jax._solver import run as run
from kbeam_jax.minimax import kbeam as kbeam
from kbeam_jax.minimax import kbeam_sgd as kbeam_sgd
from kbeam_jax.minimax import scale_by_kbeam as scale_by_kbeam

__version__ = "0.3.0"

_LAZY = ("data", "nn", "tasks")


def __getattr__(name: str):
  if name in _LAZY:
    module = importlib.import_module(f"{__name__}.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))


__all__ = [
  "Solver",
  "SolverWarning",
  "bilevel",
  "data",
  "derivatives",
  "games",
  "kbeam",
  "kbeam_sgd",
  "minimax",
  "nn",
  "parallel",
  "run",
  "scale_by_kbeam",
  "tasks",
]
