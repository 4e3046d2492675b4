"""The K-beam paper's GAN data: a mixture of Gaussians on the unit circle."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
    raise TypeError(f"{name} must be a Python int, got {value!r}.")
  value = int(value)
  if value < low or (high is not None and value > high):
    bound = f">= {low}" if high is None else f"in {low}..{high}"
    raise ValueError(f"{name} must be {bound}, got {name}={value}.")
  return value


def mog_centers(num_modes: int = 7) -> jax.Array:
  """``(num_modes, 2)`` centers ``(sin(πi/4), cos(πi/4))``, i = 0..num_modes-1 (45° apart).

  At most 8 modes fit 45° apart on the circle; a ninth would sit on the first.
  """
  num_modes = _check_int("num_modes", num_modes, 1, 8)
  i = jnp.arange(num_modes, dtype=jnp.float32)
  return jnp.stack([jnp.sin(jnp.pi * i / 4), jnp.cos(jnp.pi * i / 4)], axis=-1)


def sample_mog(key: jax.Array, n: int, num_modes: int = 7, std: float = 0.01) -> jax.Array:
  """``n`` samples of ``1/M Σ_i N(c_i, std² I)`` with the centers of ``mog_centers``.

  Examples:
    >>> import jax
    >>> from kbeam_jax import data
    >>> x = data.sample_mog(jax.random.key(0), 1000)
    >>> x.shape, bool(abs(float((x ** 2).sum(-1).mean()) - 1.0) < 0.01)
    ((1000, 2), True)
  """
  n = _check_int("n", n, 0)
  if isinstance(std, int | float) and not (math.isfinite(std) and std >= 0):  # traced: unchecked
    raise ValueError(f"std must be a finite number >= 0, got std={std!r}.")
  k_mode, k_noise = jax.random.split(key)
  modes = jax.random.randint(k_mode, (n,), 0, num_modes)
  return mog_centers(num_modes)[modes] + std * jax.random.normal(k_noise, (n, 2))
