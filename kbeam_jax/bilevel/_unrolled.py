"""The unrolled methods, ``RMD`` and ``FMD``: derivatives through the forward solve's steps."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kbeam_jax.bilevel._methods import Method, _float0_like, _perturbed


@dataclasses.dataclass(frozen=True)
class RMD(Method):
  """Reverse-mode differentiation through the inner steps (autodiff of the loop).

  Every step is rematerialized, so the reverse pass stores only the iterates ``v_t``:
  memory O(V·T). With ``checkpoint=True`` only every ``⌈√T⌉``-th iterate is stored and
  each segment is recomputed in the reverse pass: memory O(V·√T) for one more forward
  pass. Forward mode and higher orders are plain autodiff of the loop too. With your own
  ``solve=``, RMD differentiates through it.

  Attributes:
    checkpoint: store ``⌈√T⌉`` checkpoints instead of every iterate.

  Examples:
    >>> from kbeam_jax import bilevel
    >>> bilevel.RMD(checkpoint=True)
    RMD(checkpoint=True)

  References:
    Maclaurin et al., Gradient-based Hyperparameter Optimization through Reversible
    Learning, ICML 2015; Franceschi et al., ICML 2017.
  """

  unrolled: ClassVar[bool] = True
  checkpoint: bool = False

  def __post_init__(self):
    if not isinstance(self.checkpoint, bool):
      raise ValueError(f"RMD.checkpoint must be a bool, got checkpoint={self.checkpoint!r}.")

  @property
  def remat(self):  # type: ignore[override]
    return "sqrt" if self.checkpoint else "step"

  def solution(self, problem, u, v0, data, params):
    return problem.solve(u, v0, data, params, self.remat)


@dataclasses.dataclass(frozen=True)
class FMD(Method):
  """Forward-mode differentiation through the inner steps.

  Carries the Jacobian ``P_t = dv_t/d(u, v0, args, inner_lr)`` forward (one tangent per
  coordinate of every differentiated input, vmapped), then contracts it with the
  tangents: exact for the unrolled loop, time O(U·V·T), memory O(U·V), independent of T.
  As a ``custom_jvp`` rule whose tangent is linear in the input tangents, it serves
  ``jvp``/``jacfwd`` and, transposed, ``grad``/``vjp`` without storing the trajectory.

  Examples:
    >>> from kbeam_jax import bilevel
    >>> bilevel.FMD()
    FMD()

  References:
    Franceschi et al., Forward and Reverse Gradient-Based Hyperparameter Optimization,
    ICML 2017.
  """

  unrolled: ClassVar[bool] = True

  def solution(self, problem, u, v0, data, params):
    return _fmd(problem, u, v0, data, params)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fmd(problem, u, v0, data, params):
  return problem.solve(u, v0, data, params, None)


def _fmd_jvp(problem, primals, tangents):
  v, steps = _fmd(problem, *primals)  # the primal re-enters the rule at higher orders
  substitute, xs, ts = _perturbed(primals, tangents)
  if not xs:
    return (v, steps), (jax.tree.map(jnp.zeros_like, v), _float0_like(steps))
  x, unravel = ravel_pytree(xs)
  loop = lambda x: problem.solve(*substitute(unravel(x)), None)[0]
  # One forward pass with the tangents of every input coordinate vmapped: dv/dx, (n, ...).
  basis = jnp.eye(x.size, dtype=x.dtype)
  jac = jax.vmap(lambda e: jax.jvp(loop, (x,), (e,))[1])(basis)
  t = ravel_pytree(ts)[0].astype(x.dtype)
  dv = jax.tree.map(lambda J, vi: jnp.tensordot(t, J, axes=1).astype(vi.dtype), jac, v)
  return (v, steps), (dv, _float0_like(steps))


_fmd.defjvp(_fmd_jvp, symbolic_zeros=True)
