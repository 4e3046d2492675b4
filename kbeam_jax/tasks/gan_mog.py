"""The K-beam paper's GAN: a generator against K discriminators on a mixture of Gaussians.

Data ``p(x) = 1/7 Σ_{i=0..6} N((sin(πi/4), cos(πi/4)), 0.01² I)`` (``kbeam_jax.data.sample_mog``),
generator ``z ~ N(0, I_256) → 128 tanh → 128 tanh → 2``, discriminator ``2 → 128 tanh →
128 tanh → 1`` logit, and the saturating minimax value

``f(u, v) = E_x log D(x; v) + E_z log(1 - D(G(z; u); v))``,

minimized over the generator ``u`` and maximized over the discriminator ``v``. Metrics:
the Jensen-Shannon divergence between two sample sets on a 20×20 histogram of [-2, 2]²
(one added to every bin, natural log), the number of modes covered and the share of
high-quality samples.

Reference: Hamm & Noh, K-Beam Minimax, ICML 2018, section 5.2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kbeam_jax.data import mog_centers

NOISE_DIM, HIDDEN, STD, NUM_MODES = 256, 128, 0.01, 7


class Generator(nnx.Module):
  """``z (.., 256) → 128 tanh → 128 tanh → 2`` (linear output)."""

  def __init__(self, rngs: nnx.Rngs, noise_dim: int = NOISE_DIM, hidden: int = HIDDEN):
    self.l1 = nnx.Linear(noise_dim, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 2, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    return self.out(jnp.tanh(self.l2(jnp.tanh(self.l1(z)))))


class Discriminator(nnx.Module):
  """``x (.., 2) → 128 tanh → 128 tanh → 1`` logit (squeezed)."""

  def __init__(self, rngs: nnx.Rngs, hidden: int = HIDDEN):
    self.l1 = nnx.Linear(2, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))[..., 0]


def graphdefs() -> tuple[nnx.GraphDef, nnx.GraphDef]:
  """The graph definitions ``(generator, discriminator)`` of the default-sized modules
  (built abstractly, no parameters drawn), for ``objective`` and ``nnx.merge``.

  Examples:
    >>> import jax
    >>> from flax import nnx
    >>> from kbeam_jax.tasks import gan_mog
    >>> g_def, d_def = gan_mog.graphdefs()
    >>> _, u = nnx.split(gan_mog.Generator(nnx.Rngs(0)), nnx.Param)
    >>> nnx.merge(g_def, u)(gan_mog.sample_noise(jax.random.key(0), 3)).shape
    (3, 2)
  """
  shape = lambda make: nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))), nnx.Param)[0]
  return shape(Generator), shape(Discriminator)


def objective(
  generator: nnx.GraphDef, discriminator: nnx.GraphDef
) -> Callable[[Any, Any, jax.Array, jax.Array], jax.Array]:
  """``f(u, v, x, z) = mean log D(x) + mean log(1 - D(G(z)))`` on parameter pytrees.

  ``u`` and ``v`` are the ``nnx.Param`` states of the two modules (as from
  ``nnx.split(module, nnx.Param)`` or ``kbeam_jax.nn.stack_modules``); ``x`` a batch of
  data, ``z`` a batch of noise. ``log D = -softplus(-logit)`` and ``log(1 - D) =
  -softplus(logit)``, so the value is finite for any logit.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from kbeam_jax.tasks import gan_mog
    >>> g_def, u = nnx.split(gan_mog.Generator(nnx.Rngs(0)), nnx.Param)
    >>> d_def, v = nnx.split(gan_mog.Discriminator(nnx.Rngs(1)), nnx.Param)
    >>> f = gan_mog.objective(g_def, d_def)
    >>> value = f(u, v, jnp.zeros((8, 2)), jnp.zeros((8, 256)))
    >>> value.shape, bool(value < 0)
    ((), True)
  """

  def f(u, v, x, z):
    D = nnx.merge(discriminator, v)
    fake = nnx.merge(generator, u)(z)
    return jnp.mean(-jax.nn.softplus(-D(x))) + jnp.mean(-jax.nn.softplus(D(fake)))

  return f


def sample_noise(key: jax.Array, n: int, noise_dim: int = NOISE_DIM) -> jax.Array:
  """``n`` draws of ``z ~ N(0, I_noise_dim)``."""
  return jax.random.normal(key, (n, noise_dim))


def histogram(x: jax.Array, bins: int = 20, lim: float = 2.0) -> jax.Array:
  """Counts of 2D samples on a ``bins × bins`` grid over ``[-lim, lim]²`` (outside: dropped)."""
  idx = jnp.floor((x + lim) / (2 * lim) * bins).astype(jnp.int32)
  inside = jnp.all((idx >= 0) & (idx < bins), axis=-1)
  flat = jnp.where(inside, idx[:, 0] * bins + idx[:, 1], bins * bins)
  return jnp.bincount(flat, length=bins * bins + 1)[:-1].reshape(bins, bins)


def jsd(x: jax.Array, y: jax.Array, bins: int = 20, lim: float = 2.0) -> jax.Array:
  """Jensen-Shannon divergence (natural log) of two sample sets on a smoothed histogram.

  ``P`` and ``Q`` are the ``bins × bins`` histograms over ``[-lim, lim]²`` with one added
  to every bin, normalized; ``JSD = ½ KL(P, M) + ½ KL(Q, M)`` with ``M = (P + Q) / 2``.
  It lies in ``[0, log 2]``.

  Examples:
    >>> import jax
    >>> from kbeam_jax import data
    >>> from kbeam_jax.tasks import gan_mog
    >>> x = data.sample_mog(jax.random.key(0), 10_000)
    >>> y = data.sample_mog(jax.random.key(1), 10_000)
    >>> bool(gan_mog.jsd(x, y) < 0.01), bool(gan_mog.jsd(x, 0.5 * y) > 0.3)
    (True, True)
  """
  p = histogram(x, bins, lim).astype(jnp.float32) + 1.0
  q = histogram(y, bins, lim).astype(jnp.float32) + 1.0
  p, q = p / jnp.sum(p), q / jnp.sum(q)
  m = 0.5 * (p + q)
  return 0.5 * jnp.sum(p * jnp.log(p / m)) + 0.5 * jnp.sum(q * jnp.log(q / m))


def mode_stats(
  samples: jax.Array, num_modes: int = NUM_MODES, std: float = STD
) -> tuple[jax.Array, jax.Array]:
  """``(modes covered, share of high-quality samples)``.

  A sample is high quality when it lies within ``3·std`` of some mode; a mode is covered
  when at least 1% of the samples are high-quality samples of that mode.
  """
  dist = jnp.linalg.norm(samples[:, None, :] - mog_centers(num_modes)[None], axis=-1)
  near = dist <= 3 * std
  per_mode = jnp.mean(near, axis=0)
  return jnp.sum(per_mode >= 0.01), jnp.mean(jnp.any(near, axis=-1))
