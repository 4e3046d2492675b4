"""The one solver type and the one driver shared by the minimax and bilevel families."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kbeam_jax._checks import check_steps


class Solver(NamedTuple):
  """A pure solver: ``state = init(key, ...)``, ``state, info = step(state, *args)``.

  Every solver of the package (K-beam, the GDA baselines, the bilevel hypergradient
  solver and the penalty method) is one of these; ``init`` always takes a random key
  first (deterministic solvers ignore it), ``step`` passes ``*args`` (a batch, say) to
  the objectives, and ``kbeam_jax.run`` drives any of them.
  """

  init: Callable[..., Any]
  step: Callable[..., tuple[Any, Any]]


def run(
  step: Callable[..., tuple[Any, Any]],
  state: Any,
  num_steps: int,
  *args: Any,
  trace: Callable[[Any, Any], Any] | None = None,
) -> tuple[Any, Any]:
  """Runs ``num_steps`` of ``step(state, *args)`` in one ``lax.scan``.

  Args:
    step: a solver's ``step(state, *args) -> (state, info)``.
    state: the initial state (from the solver's ``init``).
    num_steps: number of steps, a Python int; or an integer array (traced under
      ``jit``), so that one compiled program serves every step count: then nothing is
      recorded and the trajectory is ``None``.
    *args: extra arguments passed unchanged to every step (a fixed batch, say).
    trace: ``trace(state, info) -> pytree`` picks what to record after each step;
      by default the ``info`` of every step is recorded.

  Returns:
    ``(final_state, trajectory)``, the trajectory stacked on a leading axis of size
    ``num_steps``. Wrap the call in ``jax.jit`` (with ``step`` and ``num_steps`` static,
    or closed over) to compile the whole loop once.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import minimax
    >>> solver = minimax.alternating_gda(lambda u, v: u * v, optax.sgd(0.1), optax.sgd(0.1))
    >>> state = solver.init(jax.random.key(0), jnp.array(1.0), jnp.array(1.0))
    >>> state, us = kbeam_jax.run(solver.step, state, 3, trace=lambda s, info: s.u)
    >>> us.shape
    (3,)
  """
  if isinstance(num_steps, jax.Array):
    if trace is not None:
      raise ValueError(
        "run(num_steps=<array>) records no trajectory (its length is not static); drop "
        "trace=, or pass num_steps as a Python int."
      )
    if num_steps.shape or not jnp.issubdtype(num_steps.dtype, jnp.integer):
      what = f"{num_steps.dtype}{list(num_steps.shape)}"
      raise TypeError(f"num_steps must be a scalar integer, got an array of {what}.")
    final = jax.lax.fori_loop(0, num_steps, lambda _, s: step(s, *args)[0], state)
    return final, None
  num_steps = check_steps("num_steps", num_steps)

  def body(carry, _):
    new_state, info = step(carry, *args)
    return new_state, (info if trace is None else trace(new_state, info))

  return jax.lax.scan(body, state, length=num_steps)
