"""The one solver type and the one driver shared by the minimax and bilevel families."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kbeam_jax._checks import check_steps


class Solver(NamedTuple):
  """A pure solver: ``state = init(key, ...)``, ``state, info = step(state, *args)``.

  Every solver of the package (K-beam, the GDA baselines, the bilevel hypergradient
  solver, the penalty method and the game solvers) is one of these; ``init`` takes a
  random key first (deterministic solvers ignore it), except the ``games`` solvers, whose
  ``init(players)`` starts from the players given; ``step`` passes ``*args`` (a batch,
  say) to the objectives, and ``kbeam_jax.run`` drives any of them.
  """

  init: Callable[..., Any]
  step: Callable[..., tuple[Any, Any]]


def run(
  step: Callable[..., tuple[Any, Any]],
  state: Any,
  num_steps: int,
  *args: Any,
  trace: Callable[[Any, Any], Any] | None = None,
  warn: bool = True,
) -> tuple[Any, Any]:
  """Runs ``num_steps`` of ``step(state, *args)`` in one ``lax.scan``.

  After the loop, one host callback warns (``SolverWarning``) of the steps whose info
  flags trouble: skipped updates, divergence, non-finite hypergradients, negative
  curvature. A clean run calls nothing; the runs of one ``vmap`` share one callback (per
  device and per call of ``run``: under ``shard_map`` each flagged shard warns, and a
  ``run`` inside a ``scan`` warns at every iteration that flags).

  Args:
    step: a solver's ``step(state, *args) -> (state, info)``.
    state: the initial state (from the solver's ``init``).
    num_steps: number of steps, a Python int; or an integer array (traced under
      ``jit``), so that one compiled program serves every step count: then nothing is
      recorded and the trajectory is ``None``.
    *args: extra arguments passed unchanged to every step (a fixed batch, say).
    trace: ``trace(state, info) -> pytree`` picks what to record after each step;
      by default the ``info`` of every step is recorded.
    warn: ``False`` leaves the callback out (then record the info fields you need with
      ``trace``; with an array ``num_steps`` the flags are then lost). JAX's persistent
      compilation cache never stores a program that holds a host callback, so a program
      that is compiled again in every process (a long training chunk, say) can pass
      ``warn=False`` to be cached.

  Returns:
    ``(final_state, trajectory)``, the trajectory stacked on a leading axis of size
    ``num_steps``. Wrap the call in ``jax.jit`` (with ``step`` and ``num_steps`` static,
    or closed over) to compile the whole loop once.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import kbeam_jax
    >>> from kbeam_jax import minimax
    >>> solver = minimax.alternating_gda(lambda u, v: u * v, optax.sgd(0.1), optax.sgd(0.1))
    >>> state = solver.init(jax.random.key(0), jnp.array(1.0), jnp.array(1.0))
    >>> state, us = kbeam_jax.run(solver.step, state, 3, trace=lambda s, info: s.u)
    >>> us.shape
    (3,)
  """
  if not isinstance(warn, bool):
    raise TypeError(f"run: warn must be True or False, got {warn!r}.")
  if isinstance(num_steps, jax.Array):
    if trace is not None:
      raise ValueError(
        "run(num_steps=<array>) records no trajectory (its length is not static); drop "
        "trace=, or pass num_steps as a Python int."
      )
    if num_steps.shape or not jnp.issubdtype(num_steps.dtype, jnp.integer):
      what = f"{num_steps.dtype}{list(num_steps.shape)}"
      raise TypeError(f"num_steps must be a scalar integer, got an array of {what}.")

    def loop_body(_, carry):
      state, counts = carry
      new_state, info = _checked_step(step, state, args)
      return new_state, counts + _flags(info)

    final, counts = jax.lax.fori_loop(0, num_steps, loop_body, (state, _no_flags()))
    if warn:
      _report(counts, num_steps)
    return final, None
  num_steps = check_steps("num_steps", num_steps)

  def body(state, _):
    new_state, info = _checked_step(step, state, args)
    record = info if trace is None else trace(new_state, info)
    return new_state, (record, _flags(info))

  # the flags as outputs, not a carry that starts from a constant: under shard_map with
  # check_vma a carry must vary over the same axes in and out
  final, (trajectory, flags) = jax.lax.scan(body, state, length=num_steps)
  if num_steps and warn:
    _report(jnp.sum(flags, axis=0), jnp.asarray(num_steps, jnp.int32))
  return final, trajectory


class SolverWarning(RuntimeWarning):
  """A run skipped steps, or its solver flagged divergence, non-finite values or a lower
  problem that is not convex at its answer (negative curvature met by ``bilevel.CG``)."""


# What a step's info may say about the step, as (field, value that flags it, message).
_HEALTH = (
  ("update_finite", False, "were skipped: the leader's update was not finite (u and its "
   "optimizer state kept their values; info.num_nonfinite counts the beams left out)"),
  ("diverging", True, "flagged divergence (info.diverging): lower the inner step size, or "
   "pass inner_lr='auto' for one set by the lower problem's curvature (bilevel.penalty: "
   "cap max_gamma or raise gamma, as PenaltyInfo.diverging says)"),
  ("finite", False, "gave a non-finite hypergradient (info.finite is False)"),
  ("negative_curvature", True, "met negative curvature in CG's linear solve "
   "(info.negative_curvature): the Hessian of the lower objective in v is not positive "
   "definite there, so the inner answer is a saddle or a maximum of g, not its minimum"),
)  # fmt: skip


def _no_flags() -> jax.Array:
  return jnp.zeros((len(_HEALTH),), jnp.int32)


def _flags(info: Any) -> jax.Array:
  """Per-field counts of this step's flags (0 where the info has no such field)."""
  out = []
  for field, bad, _ in _HEALTH:
    value = getattr(info, field, None)
    if value is None:
      out.append(jnp.zeros([], jnp.int32))
    else:
      flagged = jnp.asarray(value) if bad else ~jnp.asarray(value, bool)
      out.append(jnp.any(flagged).astype(jnp.int32))
  return jnp.stack(out)


@jax.custom_batching.custom_vmap
def _report(counts: jax.Array, num_steps: jax.Array) -> jax.Array:
  """One host callback per run that warns of its flagged steps. Under ``vmap`` it stays
  one callback for the whole batch (``jax.debug.callback`` alone is unrolled into one per
  vmapped run: 100 trials took 190 times as long as without it)."""
  call_warn = lambda: jax.debug.callback(_warn, counts, num_steps)
  jax.lax.cond(jnp.any(counts > 0), call_warn, lambda: None)  # a clean run calls nothing
  return counts


@_report.def_vmap
def _report_vmap(axis_size: int, in_batched: list[bool], counts, num_steps):
  if not in_batched[0]:
    counts = jnp.broadcast_to(counts, (axis_size, *counts.shape))
  return _report(counts, num_steps), True


def _warn(counts: Any, num_steps: Any) -> None:
  """One ``SolverWarning`` per run (or per batch of vmapped runs), from the host, naming
  every kind of flagged step."""
  import numpy as np

  counts = np.asarray(counts).reshape(-1, len(_HEALTH))
  low, high, runs = int(np.min(num_steps)), int(np.max(num_steps)), counts.shape[0]
  steps = f"{high}" if low == high else f"{low}–{high}"  # a vmapped num_steps
  parts = []
  for column, (_, _, msg) in zip(counts.T, _HEALTH, strict=True):
    flagged = int(np.sum(column > 0))
    if flagged and runs == 1:
      parts.append(f"{int(column[0])} of {steps} steps {msg}")
    elif flagged:
      parts.append(
        f"up to {int(column.max())} of {steps} steps in {flagged} of {runs} vmapped runs {msg}"
      )
  if parts:
    warnings.warn("kbeam_jax.run: " + "; ".join(parts) + ".", SolverWarning, stacklevel=2)


def _checked_step(step: Callable[..., Any], state: Any, args: tuple[Any, ...]) -> Any:
  out = step(state, *args)
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(
      f"run: step must return a pair (state, info), but {getattr(step, '__name__', step)!r} "
      f"returned {type(out).__name__}"
      + (f" of length {len(out)}" if isinstance(out, tuple) else "")
      + ". A solver's step does; a function of your own returns (new_state, info) with any "
      "info (None will do)."
    )
  return out
