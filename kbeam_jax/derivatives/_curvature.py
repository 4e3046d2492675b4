"""The largest eigenvalue of a linear map on pytrees, by power iteration (no matrix formed).

Step sizes of gradient descent and of the Richardson / Neumann iterations are stable below
``2 / λ_max``; ``bilevel.max_curvature`` and the ``"auto"`` step sizes read ``λ_max``
from here.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from kbeam_jax._tree import PyTree, tree_random_like, tree_sq_norm, tree_vdot


def max_eigenvalue(
  matvec: Callable[[PyTree], PyTree],
  like: PyTree,
  power_steps: int = 20,
  *,
  symmetric: bool = True,
) -> jax.Array:
  """``|λ|_max`` of a linear map on pytrees by power iteration, never forming its matrix.

  Starts from a fixed pseudo-random direction (so the answer is deterministic and no
  eigenvector of a structured problem is missed by symmetry) and iterates
  ``x ← A x / |A x|``. For a symmetric ``A`` the estimate is the magnitude of the
  Rayleigh quotient ``xᵀAx`` (converging from below, at twice the rate); otherwise it is
  ``|A x|``. It is computed in float32 at least and is jit-, vmap- and grad-compatible.

  Args:
    matvec: ``x ↦ A x`` on pytrees like ``like``.
    like: a pytree with the structure, shapes and dtypes of ``x``.
    power_steps: products with ``A``, >= 1.
    symmetric: whether ``A`` is symmetric (a Hessian).

  Returns:
    The estimate of the largest ``|λ|``, a scalar array.

  Examples:
    >>> import jax.numpy as jnp
    >>> from kbeam_jax.derivatives import max_eigenvalue
    >>> A = jnp.diag(jnp.array([1.0, 3.0, -10.0]))
    >>> round(float(max_eigenvalue(lambda x: A @ x, jnp.zeros(3), 50)), 4)
    10.0
  """
  if isinstance(power_steps, bool) or not isinstance(power_steps, int) or power_steps < 1:
    raise ValueError(f"power_steps must be an int >= 1, got power_steps={power_steps!r}.")
  leaves = jax.tree.leaves(like)
  x = tree_random_like(like)
  wide = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
  tiny = jnp.finfo(wide).tiny

  def normalize(x):
    scale = jax.lax.rsqrt(jnp.maximum(tree_sq_norm(x).astype(wide), tiny))
    return jax.tree.map(lambda a: (a * scale).astype(a.dtype), x)

  x = jax.lax.fori_loop(0, power_steps - 1, lambda _, x: normalize(matvec(x)), normalize(x))
  Ax = matvec(x)
  if symmetric:
    return jnp.abs(tree_vdot(x, Ax).astype(wide))
  return jnp.sqrt(tree_sq_norm(Ax).astype(wide))
