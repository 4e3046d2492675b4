"""kbeam_jax: K-beam minimax and bilevel optimization in JAX.

Subpackages: ``kbeam_jax.minimax`` (K-beam, ε-subgradient rules, GDA baselines, optax
forms), ``kbeam_jax.derivatives`` (Hessian-vector products), ``kbeam_jax.tasks`` (the
papers' test problems).
"""

from kbeam_jax import derivatives as derivatives
from kbeam_jax import minimax as minimax
from kbeam_jax.minimax import kbeam as kbeam
from kbeam_jax.minimax import kbeam_sgd as kbeam_sgd
from kbeam_jax.minimax import scale_by_kbeam as scale_by_kbeam

__version__ = "0.1.0"

__all__ = ["derivatives", "kbeam", "kbeam_sgd", "minimax", "scale_by_kbeam"]
