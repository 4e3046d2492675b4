"""One K-beam step of the MoG GAN's generator, taken from linen and from the NNX patterns.

The same networks, the same transform (``scale_by_kbeam`` over K = 4 discriminators, then
Adam) and the same batch on every path; each step is one call from Python, as in a training
loop, timed in turns with the other paths (median per step):

* ``linen``: a linen generator, ``jax.jit`` over ``(params, opt_state)``;
* ``nnx functional``: the NNX generator split once (``nnx.split``), ``jax.jit`` over the
  plain arrays, ``nnx.update(model, params)`` when the module is wanted back;
* ``nnx.Optimizer, nnx.jit``: ``nnx.Optimizer`` with ``nn.update_without_grads`` inside
  ``nnx.jit`` (which walks the module graph on every call);
* ``nnx.Optimizer, cached_partial``: the same, through ``nnx.cached_partial`` (the NNX
  example on the documentation's home page).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kbeam_jax import data, minimax, nn
from kbeam_jax.tasks import gan_mog

NUM_CRITICS, BATCH = 4, 128


class LinenGenerator(linen.Module):
  """``gan_mog.Generator`` in linen: ``z → 128 tanh → 128 tanh → 2``."""

  @linen.compact
  def __call__(self, z):
    h = jnp.tanh(linen.Dense(gan_mog.HIDDEN)(z))
    return linen.Dense(2)(jnp.tanh(linen.Dense(gan_mog.HIDDEN)(h)))


def _paths() -> dict[str, Any]:
  """``{name: step}``, each ``step()`` one K-beam update returning the new parameters."""
  k_x, k_z = jax.random.split(jax.random.key(0))
  x, z = data.sample_mog(k_x, BATCH), gan_mog.sample_noise(k_z, BATCH)
  d_def, beams = nn.stack_modules(gan_mog.Discriminator, jax.random.key(1), NUM_CRITICS)
  beams = nnx.as_pure(beams)
  critic = lambda v, h: nnx.merge(d_def, v)(h)
  loss = lambda v, fake: (
    jnp.mean(-jax.nn.softplus(-critic(v, x))) + jnp.mean(-jax.nn.softplus(critic(v, fake)))
  )
  tx = optax.chain(
    minimax.scale_by_kbeam(optax.adam(1e-4, b1=0.5), beams), optax.adam(1e-3, b1=0.5)
  )

  def pure_step(f):
    @jax.jit
    def step(params, opt_state):
      updates, opt_state = tx.update(None, opt_state, params, minimax_fn=f)
      return optax.apply_updates(params, updates), opt_state

    return step

  def driver(step, params):
    box = {"p": params, "s": tx.init(params)}

    def call():
      box["p"], box["s"] = step(box["p"], box["s"])
      return box["p"]

    return call

  lg = LinenGenerator()
  linen_params = lg.init(jax.random.key(2), z)
  paths = {"linen": driver(pure_step(lambda p, v: loss(v, lg.apply(p, z))), linen_params)}

  model = gan_mog.Generator(nnx.Rngs(2))
  g_def, params = nnx.split(model, nnx.Param)
  f_nnx = lambda p, v: loss(v, nnx.merge(g_def, p)(z))
  paths["nnx functional"] = driver(pure_step(f_nnx), nnx.as_pure(params))

  for name in ("nnx.Optimizer, nnx.jit", "nnx.Optimizer, cached_partial"):
    module = gan_mog.Generator(nnx.Rngs(2))
    optimizer = nnx.Optimizer(module, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(module, optimizer):
      nn.update_without_grads(optimizer, module, minimax_fn=f_nnx)

    if name.endswith("cached_partial"):
      cached = nnx.cached_partial(nnx_step, module, optimizer)
      paths[name] = lambda cached=cached, module=module: (cached(), module.out.kernel[...])[1]
    else:
      paths[name] = lambda m=module, o=optimizer, s=nnx_step: (s(m, o), m.out.kernel[...])[1]
  return paths


def measure(steps: int, repeats: int) -> list[dict[str, Any]]:
  """Median ms per step of every path and its ratio to linen's."""
  from tqdm.auto import tqdm

  paths = _paths()
  times: dict[str, list[float]] = {name: [] for name in paths}
  for call in paths.values():  # compile, and run once more
    jax.block_until_ready(call())
    jax.block_until_ready(call())
  for _ in tqdm(range(repeats), desc="kbeam_rules flax paths", leave=False):
    for name, call in paths.items():
      start = time.perf_counter()
      for _ in range(steps):
        out = call()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / steps)
  linen_s = statistics.median(times["linen"])
  return [
    dict(
      path=name,
      K=NUM_CRITICS,
      ms_per_step=1e3 * statistics.median(t),
      ratio_to_linen=statistics.median(t) / linen_s,
    )
    for name, t in times.items()
  ]
