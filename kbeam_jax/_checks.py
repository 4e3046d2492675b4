"""Input checks shared by the solvers: each raises an error that says what is
wrong and how to fix it, at trace time, before any numerics run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def check_num_beams(K: Any) -> int:
  """Returns ``K`` as an int, or raises if it is not a positive integer."""
  if isinstance(K, bool) or not isinstance(K, int | jnp.integer):
    raise TypeError(f"K (the number of beams) must be a Python int, got {K!r}.")
  if K < 1:
    raise ValueError(f"K (the number of beams) must be >= 1, got K={K}.")
  return int(K)


def _concrete(value: Any) -> bool:
  return not (isinstance(value, jax.core.Tracer) or callable(value))


def check_nonnegative(name: str, value: Any) -> None:
  """Raises if a concrete ``value`` is negative or NaN; traced values and schedules pass.

  Examples:
    >>> check_nonnegative("epsilon", float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: epsilon must be a number >= 0, got epsilon=nan.
  """
  if _concrete(value) and not np.all(np.asarray(value) >= 0):  # NaN fails >= too
    raise ValueError(f"{name} must be a number >= 0, got {name}={value}.")


def check_positive(name: str, value: Any) -> None:
  """Raises if a concrete ``value`` is not > 0 (NaN included); traced values pass."""
  if _concrete(value) and not np.all(np.asarray(value) > 0):
    raise ValueError(f"{name} must be a number > 0, got {name}={value}.")


def check_steps(name: str, value: Any) -> int:
  """Returns a step count as an int, or raises if it is not a non-negative int."""
  if isinstance(value, bool) or not isinstance(value, int | jnp.integer):
    raise TypeError(f"{name} must be a Python int, got {value!r}.")
  if value < 0:
    raise ValueError(f"{name} must be >= 0, got {name}={value}.")
  return int(value)


def check_same_structure(a: Any, b: Any, what_a: str, what_b: str) -> None:
  """Raises if two pytrees do not share one tree structure."""
  ta, tb = jax.tree.structure(a), jax.tree.structure(b)
  if ta != tb:
    raise ValueError(
      f"{what_a} and {what_b} must have the same pytree structure.\n"
      f"  {what_a}: {ta}\n  {what_b}: {tb}\n"
      "Pass pytrees built the same way (same container types, keys and order)."
    )


def check_leading_axis(tree: Any, K: int, what: str) -> None:
  """Raises unless every leaf of ``tree`` has a leading axis of size ``K``."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  if not leaves:
    raise ValueError(f"{what} is an empty pytree; it needs at least one array leaf.")
  for path, leaf in leaves:
    shape = jnp.shape(leaf)
    if not shape or shape[0] != K:
      raise ValueError(
        f"{what} must be stacked on a leading axis of size K={K}, but the leaf at "
        f"{jax.tree_util.keystr(path) or '<root>'} has shape {shape}. Stack the K "
        "beams with jax.tree.map(lambda *xs: jnp.stack(xs), *beams), or pass an "
        "initializer function key -> v instead."
      )


def scalar_output(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
  """Wraps ``fn`` so that a non-scalar return value raises a clear error."""

  def wrapped(*args, **kwargs):
    try:
      out = fn(*args, **kwargs)
    except TypeError as e:
      given = ", ".join(_describe(a) for a in args)
      extra = f" and keywords {sorted(kwargs)}" if kwargs else ""
      e.add_note(
        f"kbeam_jax called {name} with {len(args)} positional arguments ({given}){extra}: "
        "the two variables first, then the *args given to step/argmin (a batch, say)."
      )
      raise
    shape = jnp.shape(out)
    if shape != ():
      raise ValueError(
        f"{name} must return a scalar, but it returned an array of shape {shape}. "
        "Reduce it (for example with .mean() over the batch) before returning."
      )
    return out

  return wrapped


def _describe(x: Any) -> str:
  """``float32[3]`` for an array, ``dict of 2 leaves`` for a pytree."""
  leaves = jax.tree.leaves(x)
  if len(leaves) == 1 and leaves[0] is x and hasattr(x, "dtype"):
    return f"{x.dtype}{list(jnp.shape(x))}"
  return f"{type(x).__name__} of {len(leaves)} leaves"


def check_float_leaves(tree: Any, what: str) -> None:
  """Raises if a leaf of ``tree`` is not a floating-point array."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
        f"{what} must hold floating-point arrays to be differentiated, but the leaf at "
        f"{jax.tree_util.keystr(path) or '<root>'} has dtype {jnp.result_type(leaf)}."
      )


def checked_projection(project: Callable[[Any], Any] | None, what: str) -> Callable[[Any], Any]:
  """``project``, checked at trace time to keep the structure, shapes and dtypes."""
  if project is None:
    return lambda x: x

  def checked(x):
    y = project(x)
    check_same_structure(x, y, what, f"project_{what}({what})")
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
      if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
        raise ValueError(
          f"project_{what} must return {what} with the same shapes and dtypes, but it turned "
          f"{jnp.shape(a)} {jnp.result_type(a)} into {jnp.shape(b)} {jnp.result_type(b)}."
        )
    return y

  return checked


def check_optimizer(name: str, opt: Any) -> optax.GradientTransformationExtraArgs:
  """``opt`` if it is an optax optimizer (built, not the factory), with extra-args support."""
  if isinstance(opt, optax.GradientTransformation):
    return optax.with_extra_args_support(opt)
  hint = ""
  if callable(opt):
    hint = (
      f" It is a function: call it to build the optimizer, e.g. {name}=optax.sgd(0.1), "
      f"not {name}=optax.sgd."
    )
  raise TypeError(f"{name} must be an optax.GradientTransformation, got {opt!r}.{hint}")
