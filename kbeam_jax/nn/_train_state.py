"""A linen ``TrainState`` whose ``apply_gradients`` forwards extra arguments to the transform."""

from __future__ import annotations

import dataclasses
from typing import Any

import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` for transforms that need extra arguments.

  Linen's ``TrainState.apply_gradients(grads=..., **kwargs)`` treats every keyword as a
  field to replace and calls ``tx.update(grads, opt_state, params)`` with nothing else,
  so ``scale_by_kbeam``'s ``minimax_fn`` or ``scale_by_hypergradient``'s ``upper_fn`` /
  ``lower_fn`` cannot reach the transform. Here keywords that name a field of the state
  still replace it, and all others go to ``tx.update`` as keyword arguments.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as linen
    >>> from kbeam_jax import minimax, nn
    >>> model = linen.Dense(1)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 2)))
    >>> tx = minimax.kbeam_sgd(0.1, optax.sgd(0.1), jnp.zeros((3, 1, 1)))
    >>> state = nn.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    >>> x = jnp.ones((4, 2))
    >>> f = lambda p, v: jnp.mean((state.apply_fn(p, x) - v) ** 2)
    >>> state = state.apply_gradients(grads=None, minimax_fn=f)
    >>> int(state.step)
    1
  """

  def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
    names = {f.name for f in dataclasses.fields(self)}
    replace = {k: v for k, v in kwargs.items() if k in names}
    extra_args = {k: v for k, v in kwargs.items() if k not in names}
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
    return self.replace(
      step=self.step + 1,
      params=optax.apply_updates(self.params, updates),
      opt_state=opt_state,
      **replace,
    )
