"""K beams of a Flax NNX module: K independently initialized copies as one stacked state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from kbeam_jax._checks import check_num_beams
from kbeam_jax._tree import PyTree


def stack_modules(
  make: Callable[[nnx.Rngs], nnx.Module], key: jax.Array, num_beams: int
) -> tuple[nnx.GraphDef, PyTree]:
  """Builds ``num_beams`` copies of ``make(rngs)``, each from its own key, stacked on axis 0.

  The copies are created in one ``jax.vmap`` (split inside, stacked states out), so K
  initializations cost one trace. The result is what the K-beam solver and
  ``scale_by_kbeam`` take as their beams; ``nnx.merge(graphdef, unstack(params, k))``
  rebuilds beam k, and ``apply_beams`` evaluates all of them in one vmapped call.

  Args:
    make: ``rngs -> module``; every variable of the module must be an ``nnx.Param``
      (``nnx.BatchNorm``'s statistics or RNG streams are an error saying what to use).
    key: a ``jax.random.key``; beam k is built from ``jax.random.split(key, K)[k]``.
    num_beams: K >= 1.

  Returns:
    ``(graphdef, params)``: the module's graph definition and its parameters as plain
    arrays with a leading axis of size K.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from kbeam_jax import nn
    >>> graphdef, beams = nn.stack_modules(lambda rngs: nnx.Linear(2, 1, rngs=rngs),
    ...                                    jax.random.key(0), 5)
    >>> beams["kernel"].shape
    (5, 2, 1)
    >>> nn.apply_beams(graphdef, beams, jnp.ones((3, 2))).shape
    (5, 3, 1)
  """
  K = check_num_beams(num_beams)
  if not callable(make):
    raise TypeError(
      f"stack_modules builds the beams itself: make must be rngs -> module (a Module class such "
      f"as MyCritic, or lambda rngs: MyCritic(..., rngs=rngs)), got {type(make).__name__}. "
      "Beams that are already stacked arrays go to the solver's init directly."
    )
  module = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  if not isinstance(module, nnx.Module):
    raise TypeError(
      f"stack_modules: make(rngs) must return an nnx.Module, got {type(module).__name__}."
    )
  graphdef, _, rest = nnx.split(module, nnx.Param, ...)
  if jax.tree.leaves(rest):
    kinds = sorted({type(v).__name__ for v in jax.tree.leaves(rest, is_leaf=_is_var)})
    raise ValueError(
      "stack_modules needs a module whose variables are all nnx.Param; this one also holds "
      f"{kinds}. A beam's variables are what the follower optimizer ascends on, and "
      "statistics that a forward pass writes (BatchNorm's running mean and variance) would "
      "never be updated there (or be changed by weight decay). In the beams' module use a "
      "normalization without running statistics (nnx.LayerNorm, nnx.GroupNorm) or none; "
      "BatchNorm can stay in the leader (see kbeam_jax.nn.update_without_grads)."
    )

  def one(k):
    _, params = nnx.split(make(nnx.Rngs(k)), nnx.Param)
    return nnx.as_pure(params)

  return graphdef, jax.vmap(one)(jax.random.split(key, K))


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def unstack(params: PyTree, k: int | jax.Array) -> PyTree:
  """Beam ``k`` of a stacked pytree (every leaf indexed at ``k`` on axis 0)."""
  return jax.tree.map(lambda x: x[k], params)


def apply_beams(graphdef: nnx.GraphDef, params: PyTree, *args: Any, **kwargs: Any) -> PyTree:
  """Calls every beam on the same inputs in one ``jax.vmap``; outputs get a leading axis K."""
  return jax.vmap(lambda p: nnx.merge(graphdef, p)(*args, **kwargs))(params)
