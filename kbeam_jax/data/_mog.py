"""The K-beam paper's GAN data: a mixture of Gaussians on the unit circle."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mog_centers(num_modes: int = 7) -> jax.Array:
  """``(num_modes, 2)`` centers ``(sin(πi/4), cos(πi/4))``, i = 0..num_modes-1 (45° apart)."""
  i = jnp.arange(num_modes, dtype=jnp.float32)
  return jnp.stack([jnp.sin(jnp.pi * i / 4), jnp.cos(jnp.pi * i / 4)], axis=-1)


def sample_mog(key: jax.Array, n: int, num_modes: int = 7, std: float = 0.01) -> jax.Array:
  """``n`` samples of ``1/M Σ_i N(c_i, std² I)`` with the centers of ``mog_centers``.

  Example:
    >>> import jax
    >>> from kbeam_jax import data
    >>> x = data.sample_mog(jax.random.key(0), 1000)
    >>> x.shape, bool(abs(float((x ** 2).sum(-1).mean()) - 1.0) < 0.01)
    ((1000, 2), True)
  """
  k_mode, k_noise = jax.random.split(key)
  modes = jax.random.randint(k_mode, (n,), 0, num_modes)
  return mog_centers(num_modes)[modes] + std * jax.random.normal(k_noise, (n, 2))
