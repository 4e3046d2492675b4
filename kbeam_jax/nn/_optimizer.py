"""``nnx.Optimizer`` with transforms that compute their own direction (K-beam), and reading
a transform's state out of an ``nnx.Optimizer`` as plain arrays."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from kbeam_jax._tree import PyTree


def update_without_grads(optimizer: nnx.Optimizer, model: nnx.Module, /, **extra_args: Any):
  """``optimizer.update(model, grads, **extra_args)`` for a transform that needs no grads.

  ``scale_by_kbeam`` / ``kbeam_sgd`` ignore the incoming gradient (K-beam needs the
  gradient at its best beams, which only it knows), but ``nnx.Optimizer.update`` requires
  one with the parameters' structure: ``update(model, None, ...)`` fails with "grads and
  params must have the same pytree structure". This does the same update as
  ``nnx.Optimizer.update`` (the transform, then ``optax.apply_updates`` on the variables
  selected by the optimizer's ``wrt``, and ``optimizer.step += 1``), passing ``None`` as
  the gradient. Use it inside ``nnx.jit`` like ``optimizer.update``, and call the jitted
  step through ``nnx.cached_partial(step, model, optimizer)``: a plain ``nnx.jit`` call
  walks the module and optimizer graphs every time (1.7x linen's time per K-beam step of
  a small GAN, against 1.1x cached; see "Speed" on the documentation's home page,
  docs/pages/index.md).

  Models with state outside ``wrt`` (``nnx.BatchNorm``'s running statistics): split it
  out as plain arrays and merge it back in the objective, ``graphdef, _, rest =
  nnx.split(model, nnx.Param, ...)``, ``rest = nnx.as_pure(rest)`` and
  ``nnx.merge(graphdef, params, rest)`` (the Variables themselves cannot be written from
  inside the transform's ``vmap`` / ``grad``). In training mode BatchNorm then normalizes
  by the batch, but the K-beam evaluations do not advance the running statistics: call
  ``model(x)`` once after the update to do that (tested; see "With Flax NNX" on the
  documentation's home page). Beams cannot hold such state (``stack_modules`` says so).

  Args:
    optimizer: an ``nnx.Optimizer`` whose ``tx`` computes its own direction
      (``scale_by_kbeam``, ``kbeam_sgd``, or a chain that starts with one of them).
    model: the module the optimizer was built for (updated in place).
    **extra_args: the transform's keyword arguments, e.g. ``minimax_fn=``.

  Returns:
    The updates applied (a pytree of the ``wrt`` variables' values).

  Raises:
    TypeError: the transform returned no updates for the parameters (it needs gradients:
      use ``optimizer.update(model, grads, ...)``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from kbeam_jax import minimax, nn
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> graphdef, _ = nnx.split(model, nnx.Param)
    >>> x = jnp.ones((4, 2))
    >>> f = lambda params, v: jnp.mean((nnx.merge(graphdef, params)(x)[:, 0] - v[0]) ** 2) - v @ v
    >>> optimizer = nnx.Optimizer(
    ...     model, minimax.kbeam_sgd(0.1, optax.sgd(0.1), jnp.zeros((3, 1))), wrt=nnx.Param)
    >>> _ = nn.update_without_grads(optimizer, model, minimax_fn=f)
    >>> int(optimizer.step[...]), nn.optimizer_state(optimizer, "count")
    (1, Array(1, dtype=int32))
  """
  graph = getattr(optimizer, "graph", None)
  params = nnx.as_pure(nnx.state(model, optimizer.wrt, graph=graph))
  opt_state = nnx.as_pure(optimizer.opt_state)
  try:
    updates, new_opt_state = optimizer.tx.update(None, opt_state, params, **nnx.as_pure(extra_args))
  except (TypeError, ValueError) as e:
    e.add_note(
      "kbeam_jax.nn.update_without_grads passes grads=None: its transform must compute its "
      "own direction (scale_by_kbeam, kbeam_sgd). For other transforms call "
      "optimizer.update(model, grads, ...); a wrapper that accumulates gradients "
      "(optax.MultiSteps around K-beam) needs arrays: optimizer.update(model, "
      "jax.tree.map(jnp.zeros_like, grads_like_params), minimax_fn=...) (K-beam ignores "
      "them)."
    )
    raise
  if jax.tree.structure(updates) != jax.tree.structure(params):
    raise TypeError(
      "update_without_grads: the transform returned updates of structure "
      f"{jax.tree.structure(updates)} for parameters of structure {jax.tree.structure(params)}"
      ": it needs gradients (only scale_by_kbeam / kbeam_sgd and chains starting with them "
      "compute their own). Call optimizer.update(model, grads, ...) instead."
    )
  nnx.update(model, optax.apply_updates(params, updates))
  nnx.update(optimizer.opt_state, nnx.state(new_opt_state, graph=graph))
  optimizer.step[...] += 1
  return updates


def _field_names(tree: PyTree) -> list[str]:
  """The field names of every ``NamedTuple`` in ``tree`` (optax states nest in tuples)."""
  names: set[str] = set()

  def walk(x):
    if isinstance(x, tuple) and hasattr(x, "_fields"):
      names.update(x._fields)
    if isinstance(x, tuple | list):
      for y in x:
        walk(y)
    elif isinstance(x, dict):
      for y in x.values():
        walk(y)

  walk(tree)
  return sorted(names)


def optimizer_state(optimizer: nnx.Optimizer, name: str | None = None) -> PyTree:
  """The transform's state inside an ``nnx.Optimizer`` as plain arrays, or one field of it.

  ``optimizer.opt_state`` wraps every array in an ``nnx`` ``OptArray`` variable, so
  ``optax.tree.get(optimizer.opt_state, "certificate")`` returns a wrapper, not an array.
  This unwraps the state (``nnx.as_pure``) into the structure ``tx.init`` returned.

  Args:
    optimizer: an ``nnx.Optimizer``.
    name: a field of the transform's state (looked up with ``optax.tree.get``), e.g.
      ``"certificate"``, ``"values"``, ``"best"`` or ``"beams"`` of ``scale_by_kbeam``;
      ``None`` for the whole state.

  Returns:
    The state (the optax ``NamedTuple`` s with jax arrays), or the field's value.

  Raises:
    KeyError: no field ``name`` in the state (the message lists the fields there are).
  """
  state = nnx.as_pure(optimizer.opt_state)
  if name is None:
    return state
  value = optax.tree.get(state, name, default=_MISSING)
  if value is _MISSING:
    raise KeyError(
      f"the optimizer's transform state has no field {name!r}; its fields are "
      f"{_field_names(state)}."
    )
  return value


_MISSING = object()
